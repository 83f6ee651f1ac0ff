//! Emulated devices: the port-I/O and MMIO buses, legacy PC devices and virtio devices.

pub mod bus;
pub mod legacy;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
