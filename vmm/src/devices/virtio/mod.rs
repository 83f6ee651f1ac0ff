//! Virtio devices on the virtio-mmio transport (virtio 1.x, split queues).
//!
//! A device depends only on guest memory, its queues, eventfds and the [`VirtioInterrupt`]
//! trait, never on KVM: unit tests and fuzz targets drive it with queues in plain memory.

pub mod balloon;
pub mod block;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod queue;
pub mod vsock;

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use mmio::MmioTransport;

/// `VIRTIO_F_VERSION_1`: the modern interface; mandatory on our transport.
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up.
    pub const FAILED: u32 = 128;
}

/// Copies the device's configuration space `cfg` from `offset` into `data`; bytes beyond
/// it (or at an offset that overflows) read as zero. The guest chooses offset and length.
pub fn read_config_space(cfg: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = offset
            .checked_add(i as u64)
            .and_then(|o| cfg.get(usize::try_from(o).ok()?))
            .copied()
            .unwrap_or(0);
    }
}

/// Interrupt status bits (the `InterruptStatus` register).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptKind {
    /// Buffers were put in a used ring.
    UsedBuffer = 1,
    /// The configuration space changed.
    ConfigChange = 2,
}

/// How a device interrupts the guest.
pub trait VirtioInterrupt: Send + Sync {
    /// Sets the status bit and raises the interrupt.
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()>;
}

/// An interrupt line: the status register shared with the transport, and an eventfd that is
/// registered as a KVM irqfd (or read by a test).
#[derive(Debug)]
pub struct IrqLine {
    status: AtomicU32,
    evt: EventFd,
}

impl IrqLine {
    /// A line signalling `evt`.
    pub fn new(evt: EventFd) -> Arc<Self> {
        Arc::new(Self {
            status: AtomicU32::new(0),
            evt,
        })
    }

    /// The eventfd (for `KVM_IRQFD`).
    pub fn evt(&self) -> &EventFd {
        &self.evt
    }

    /// The pending status bits.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clears acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

impl VirtioInterrupt for IrqLine {
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()> {
        self.status.fetch_or(kind as u32, Ordering::SeqCst);
        self.evt.write(1)
    }
}

/// Errors activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up a different number of queues than the device has.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// What the device needs.
        expected: usize,
        /// What it got.
        got: usize,
    },
    /// Something the device needs at activation failed.
    #[error("activation failed: {0}")]
    Backend(String),
}

/// What an activated device works with: guest memory, the driver's queues (in the device's
/// order) and the line that interrupts the guest.
pub struct Active {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The driver's queues.
    pub queues: Vec<Queue>,
    /// The device's interrupt.
    pub interrupt: Arc<dyn VirtioInterrupt>,
}

impl Active {
    /// The state of a device the driver activated with `queues`, which must be `expected`
    /// in number.
    pub fn new(
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
        expected: usize,
    ) -> Result<Self, ActivateError> {
        check_queue_count(queues.len(), expected)?;
        Ok(Self {
            mem,
            queues,
            interrupt,
        })
    }
}

impl Active {
    /// Raises the used-buffer interrupt for entries just added to queue `index`, unless its
    /// driver asked for none now ([`queue::driver_wants_interrupt`]). `Ok(false)`: not
    /// raised; an error: the interrupt could not be signalled.
    pub fn signal_used(&self, index: usize) -> std::io::Result<bool> {
        match self.queues.get(index) {
            Some(queue) if !queue::driver_wants_interrupt(queue, &self.mem) => Ok(false),
            _ => self
                .interrupt
                .trigger(InterruptKind::UsedBuffer)
                .map(|()| true),
        }
    }
}

/// Refuses an activation with a number of queues other than the device's.
pub fn check_queue_count(got: usize, expected: usize) -> Result<(), ActivateError> {
    if got == expected {
        Ok(())
    } else {
        Err(ActivateError::QueueCount { expected, got })
    }
}

/// A virtio device model (the Firecracker shape: features, queues, config space, activate,
/// reset), plus the two event entry points the VMM's event loop calls.
pub trait VirtioDevice: Send {
    /// Virtio device id (e.g. 19 for vsock).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers.
    fn avail_features(&self) -> u64;
    /// Records what the driver accepted (a subset of [`Self::avail_features`]).
    fn set_acked_features(&mut self, features: u64);
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the driver's queues.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError>;
    /// Returns the device to its initial state; false if the device cannot be reset.
    fn reset(&mut self) -> bool;
    /// Whether [`Self::activate`] succeeded and no reset happened since.
    fn is_activated(&self) -> bool;
    /// The driver notified queue `index`.
    fn process_queue(&mut self, index: usize);
    /// A file descriptor the event loop watches for the device's backend, if any.
    fn backend_fd(&self) -> Option<RawFd> {
        None
    }
    /// [`Self::backend_fd`] is readable.
    fn process_backend(&mut self) {}
    /// The device's counters.
    fn metrics_json(&self) -> serde_json::Value;
    /// Offered once, before the VM runs, the queue notification eventfds (the KVM
    /// ioeventfds). A device whose external backend consumes the notifications itself
    /// (vhost-user) keeps clones and returns true: the event loop then never reads them,
    /// since a read there would steal the backend's kick.
    fn take_queue_evts(&mut self, _evts: &[EventFd]) -> bool {
        false
    }
    /// The device hit an error it cannot recover from without a driver reset (shown as
    /// `DEVICE_NEEDS_RESET` in the status register).
    fn needs_reset(&self) -> bool {
        false
    }
}
