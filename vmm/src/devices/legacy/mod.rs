//! Legacy PC devices: the 8250 UART (COM1) and the i8042 controller (for CPU reset).

mod i8042;
mod serial;

pub use i8042::I8042;
pub use serial::{Serial, SerialError};

use std::os::fd::AsRawFd;

use vmm_sys_util::eventfd::EventFd;

/// An eventfd usable as a vm-superio interrupt or reset trigger.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps `evt`.
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }

    /// The underlying eventfd.
    pub fn evt(&self) -> &EventFd {
        &self.0
    }
}

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

impl AsRawFd for EventFdTrigger {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}
