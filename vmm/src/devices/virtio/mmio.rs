//! The virtio-mmio transport, modern (version 2) register layout (virtio 1.2 §4.2.2).
//!
//! Runs on the vCPU thread that took the MMIO exit. Queue notifications go to one eventfd
//! per queue, which the VMM also registers as a KVM ioeventfd so that they normally never
//! reach this code; the event loop reads those eventfds and calls the device.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{status, IrqLine, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::BusDevice;

/// "virt" in little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// Modern transport.
pub const MMIO_VERSION: u32 = 2;
/// Our vendor id ("CRPC").
pub const VENDOR_ID: u32 = 0x4350_5243;
/// Offset of the `QueueNotify` register (for ioeventfd registration).
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;
/// Offset where the device configuration space starts.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;

/// A virtio device behind its MMIO register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    irq: Arc<IrqLine>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    /// The device's backend reads `queue_evts` itself (vhost-user).
    external_notify: bool,
    device_status: u32,
    features_select: u32,
    acked_features_select: u32,
    acked_features: u64,
    queue_select: u32,
    config_generation: u32,
    /// Register accesses the spec does not allow (bad size, bad offset, wrong state).
    invalid_accesses: u64,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.device_status)
            .finish()
    }
}

impl MmioTransport {
    /// Wraps `device`; `irq` is its interrupt line.
    pub fn new(
        mem: GuestMemoryMmap,
        mut device: Box<dyn VirtioDevice>,
        irq: Arc<IrqLine>,
    ) -> std::io::Result<Self> {
        let sizes = device.queue_max_sizes().to_vec();
        let mut queues = Vec::with_capacity(sizes.len());
        let mut queue_evts = Vec::with_capacity(sizes.len());
        for size in sizes {
            queues.push(Queue::new(size).map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string())
            })?);
            queue_evts.push(EventFd::new(libc::EFD_NONBLOCK)?);
        }
        let external_notify = device.take_queue_evts(&queue_evts);
        Ok(Self {
            device,
            mem,
            irq,
            queues,
            queue_evts,
            external_notify,
            device_status: 0,
            features_select: 0,
            acked_features_select: 0,
            acked_features: 0,
            queue_select: 0,
            config_generation: 0,
            invalid_accesses: 0,
        })
    }

    /// The per-queue notification eventfds.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// Whether the event loop must leave [`Self::queue_evts`] alone because the device's
    /// backend reads them (see [`VirtioDevice::take_queue_evts`]).
    pub fn notifications_external(&self) -> bool {
        self.external_notify
    }

    /// The device.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The device, mutably (the event loop calls its handlers).
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// The device status register.
    pub fn device_status(&self) -> u32 {
        self.device_status
    }

    /// Register accesses rejected so far.
    pub fn invalid_accesses(&self) -> u64 {
        self.invalid_accesses
    }

    fn has_status(&self, set: u32, clear: u32) -> bool {
        self.device_status & set == set && self.device_status & clear == 0
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    fn update_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        // Queue registers may only change between FEATURES_OK and DRIVER_OK.
        if !self.has_status(
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
            status::DRIVER_OK | status::FAILED,
        ) {
            self.invalid_accesses += 1;
            return;
        }
        match self.selected_queue() {
            Some(q) => f(q),
            None => self.invalid_accesses += 1,
        }
    }

    fn reset(&mut self) {
        if self.device.is_activated() && !self.device.reset() {
            // The device cannot be reset: it stays activated; tell the driver it is broken.
            self.device_status |= status::DEVICE_NEEDS_RESET;
            return;
        }
        self.device_status = 0;
        self.features_select = 0;
        self.acked_features_select = 0;
        self.acked_features = 0;
        self.queue_select = 0;
        self.irq.ack(u32::MAX);
        for q in &mut self.queues {
            q.reset();
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.device_status;
        // Bits can only be added, never taken away (except by reset).
        if value & old != old {
            self.invalid_accesses += 1;
            return;
        }
        let added = value & !old;
        if added & status::FEATURES_OK != 0 {
            let version_1 = 1u64 << VIRTIO_F_VERSION_1;
            let offered = self.device.avail_features();
            if self.acked_features & !offered != 0 || self.acked_features & version_1 == 0 {
                // Refuse: FEATURES_OK stays clear, which the driver checks.
                self.device_status = value & !status::FEATURES_OK;
                return;
            }
            self.device.set_acked_features(self.acked_features);
        }
        self.device_status = value;
        if added & status::DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        if !self.has_status(
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
            status::FAILED,
        ) || self.device.is_activated()
        {
            return;
        }
        let valid = self
            .queues
            .iter()
            .all(|q| q.ready() && q.is_valid(&self.mem));
        // The device gets its own copies of the queues; ours keep answering register reads.
        let copies: Result<Vec<Queue>, _> = self
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()))
            .collect();
        let result = match copies {
            Ok(queues) if valid => self
                .device
                .activate(self.mem.clone(), queues, self.irq.clone())
                .map_err(|e| e.to_string()),
            Ok(_) => Err("a queue is not ready or not valid".to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = result {
            tracing::warn!(device = self.device.device_type(), "activation failed: {e}");
            self.device_status |= status::DEVICE_NEEDS_RESET;
            let _ = super::VirtioInterrupt::trigger(&*self.irq, super::InterruptKind::ConfigChange);
        }
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            0x00 => MMIO_MAGIC_VALUE,
            0x04 => MMIO_VERSION,
            0x08 => self.device.device_type(),
            0x0c => VENDOR_ID,
            0x10 => match self.features_select {
                0 => self.device.avail_features() as u32,
                1 => (self.device.avail_features() >> 32) as u32,
                _ => 0,
            },
            0x34 => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            0x44 => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.ready())),
            0x60 => self.irq.status(),
            0x70 if self.device.needs_reset() => self.device_status | status::DEVICE_NEEDS_RESET,
            0x70 => self.device_status,
            0xfc => self.config_generation,
            _ => {
                self.invalid_accesses += 1;
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            0x14 => self.features_select = v,
            0x20 => {
                if !self.has_status(
                    status::ACKNOWLEDGE | status::DRIVER,
                    status::FEATURES_OK | status::FAILED,
                ) {
                    self.invalid_accesses += 1;
                    return;
                }
                match self.acked_features_select {
                    0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(v),
                    1 => {
                        self.acked_features =
                            (self.acked_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    // Feature bits past 63 do not exist; the driver may only write zero.
                    _ if v == 0 => {}
                    _ => self.invalid_accesses += 1,
                }
            }
            0x24 => self.acked_features_select = v,
            0x30 => self.queue_select = v,
            0x38 => self.update_queue(|q| q.set_size(v as u16)),
            0x44 => self.update_queue(|q| q.set_ready(v == 1)),
            0x50 => match self.queue_evts.get(v as usize) {
                Some(evt) => {
                    let _ = evt.write(1);
                }
                None => self.invalid_accesses += 1,
            },
            0x64 => self.irq.ack(v),
            0x70 => self.set_status(v),
            0x80 => self.update_queue(|q| q.set_desc_table_address(Some(v), None)),
            0x84 => self.update_queue(|q| q.set_desc_table_address(None, Some(v))),
            0x90 => self.update_queue(|q| q.set_avail_ring_address(Some(v), None)),
            0x94 => self.update_queue(|q| q.set_avail_ring_address(None, Some(v))),
            0xa0 => self.update_queue(|q| q.set_used_ring_address(Some(v), None)),
            0xa4 => self.update_queue(|q| q.set_used_ring_address(None, Some(v))),
            _ => self.invalid_accesses += 1,
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            self.invalid_accesses += 1;
            data.fill(0);
            return;
        }
        let v = self.read_reg(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            if self.has_status(status::DRIVER, status::FAILED) {
                self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            } else {
                self.invalid_accesses += 1;
            }
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            self.invalid_accesses += 1;
            return;
        }
        let mut b = [0u8; 4];
        b.copy_from_slice(data);
        self.write_reg(offset, u32::from_le_bytes(b));
    }
}

/// Test helpers: a driver that speaks to a transport the way Linux's virtio_mmio does.
#[cfg(test)]
pub(crate) mod test_driver {
    use super::*;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Address;

    /// One chain's descriptors for table index `start` on: `(address, length,
    /// device-writable)` each, linked in order. The last one links to `link_to` if given (a
    /// jump or a loop), else ends the chain.
    pub fn chain(
        start: u16,
        descs: &[(u64, u32, bool)],
        link_to: Option<u16>,
    ) -> Vec<virtio_queue::desc::RawDescriptor> {
        use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
        use virtio_queue::desc::{split::Descriptor, RawDescriptor};
        descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, writable))| {
                let mut flags = if writable { VRING_DESC_F_WRITE } else { 0 };
                let next = if i + 1 < descs.len() {
                    Some(start + i as u16 + 1)
                } else {
                    link_to
                };
                if next.is_some() {
                    flags |= VRING_DESC_F_NEXT;
                }
                RawDescriptor::from(Descriptor::new(addr, len, flags as u16, next.unwrap_or(0)))
            })
            .collect()
    }

    pub fn read(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn write(t: &mut MmioTransport, offset: u64, v: u32) {
        t.write(offset, &v.to_le_bytes());
    }

    /// Negotiates `features` and sets up each queue from its mock; then DRIVER_OK.
    pub fn bring_up(
        t: &mut MmioTransport,
        features: u64,
        queues: &[&MockSplitQueue<'_, GuestMemoryMmap>],
    ) {
        write(t, 0x70, 0);
        write(t, 0x70, status::ACKNOWLEDGE);
        write(t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
        write(t, 0x24, 0);
        write(t, 0x20, features as u32);
        write(t, 0x24, 1);
        write(t, 0x20, (features >> 32) as u32);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        write(t, 0x70, s);
        assert_eq!(read(t, 0x70), s, "device refused the features");
        for (i, q) in queues.iter().enumerate() {
            write(t, 0x30, i as u32);
            let max = read(t, 0x34);
            write(t, 0x38, max.min(256));
            let d = q.desc_table_addr().raw_value();
            let a = q.avail_addr().raw_value();
            let u = q.used_addr().raw_value();
            write(t, 0x80, d as u32);
            write(t, 0x84, (d >> 32) as u32);
            write(t, 0x90, a as u32);
            write(t, 0x94, (a >> 32) as u32);
            write(t, 0xa0, u as u32);
            write(t, 0xa4, (u >> 32) as u32);
            write(t, 0x44, 1);
        }
        write(t, 0x70, s | status::DRIVER_OK);
    }
}

#[cfg(test)]
mod tests {
    use super::test_driver::*;
    use super::*;
    use crate::devices::virtio::{ActivateError, VirtioInterrupt};
    use std::os::fd::RawFd;
    use std::sync::Mutex;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    #[derive(Default)]
    struct Probe {
        acked: u64,
        activated: bool,
        notified: Vec<usize>,
        config: [u8; 8],
    }

    struct Dummy(Arc<Mutex<Probe>>);

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn avail_features(&self) -> u64 {
            (1 << VIRTIO_F_VERSION_1) | 1
        }
        fn set_acked_features(&mut self, f: u64) {
            self.0.lock().unwrap().acked = f;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            let p = self.0.lock().unwrap();
            for (i, b) in data.iter_mut().enumerate() {
                *b = *p.config.get(offset as usize + i).unwrap_or(&0);
            }
        }
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(
            &mut self,
            _: GuestMemoryMmap,
            q: Vec<Queue>,
            _: Arc<dyn VirtioInterrupt>,
        ) -> Result<(), ActivateError> {
            assert_eq!(q.len(), 2);
            self.0.lock().unwrap().activated = true;
            Ok(())
        }
        fn reset(&mut self) -> bool {
            self.0.lock().unwrap().activated = false;
            true
        }
        fn is_activated(&self) -> bool {
            self.0.lock().unwrap().activated
        }
        fn process_queue(&mut self, index: usize) {
            self.0.lock().unwrap().notified.push(index);
        }
        fn backend_fd(&self) -> Option<RawFd> {
            None
        }
        fn process_backend(&mut self) {}
        fn metrics_json(&self) -> serde_json::Value {
            serde_json::Value::Null
        }
    }

    fn setup() -> (GuestMemoryMmap, Arc<Mutex<Probe>>, MmioTransport) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let probe = Arc::new(Mutex::new(Probe {
            config: *b"\x03\0\0\0\0\0\0\0",
            ..Default::default()
        }));
        let irq = IrqLine::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let t = MmioTransport::new(mem.clone(), Box::new(Dummy(probe.clone())), irq).unwrap();
        (mem, probe, t)
    }

    #[test]
    fn identification_registers() {
        let (_m, _p, mut t) = setup();
        assert_eq!(read(&mut t, 0x00), MMIO_MAGIC_VALUE);
        assert_eq!(read(&mut t, 0x04), 2);
        assert_eq!(read(&mut t, 0x08), 42);
        write(&mut t, 0x14, 1);
        assert_eq!(read(&mut t, 0x10), 1);
        write(&mut t, 0x30, 1);
        assert_eq!(read(&mut t, 0x34), 16);
        write(&mut t, 0x30, 7);
        assert_eq!(read(&mut t, 0x34), 0);
        let mut b = [0u8; 1];
        t.read(0x100, &mut b);
        assert_eq!(b[0], 3);
    }

    #[test]
    fn full_bring_up_activates_and_notifies() {
        let (mem, probe, mut t) = setup();
        let q0 = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        let q1 = MockSplitQueue::create(&mem, GuestAddress(0x2000), 16);
        bring_up(&mut t, (1 << VIRTIO_F_VERSION_1) | 1, &[&q0, &q1]);
        assert!(probe.lock().unwrap().activated);
        assert_eq!(probe.lock().unwrap().acked, (1 << 32) | 1);
        write(&mut t, 0x50, 1);
        assert_eq!(t.queue_evts()[1].read().unwrap(), 1);
        // Queue registers are frozen after DRIVER_OK.
        let before = t.invalid_accesses();
        write(&mut t, 0x38, 8);
        assert_eq!(t.invalid_accesses(), before + 1);
        // Reset brings everything back.
        write(&mut t, 0x70, 0);
        assert!(!probe.lock().unwrap().activated);
        assert_eq!(read(&mut t, 0x70), 0);
    }

    #[test]
    fn features_without_version_1_or_unknown_are_refused() {
        let (_m, _p, mut t) = setup();
        write(&mut t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
        write(&mut t, 0x24, 0);
        write(&mut t, 0x20, 1);
        write(
            &mut t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(read(&mut t, 0x70) & status::FEATURES_OK, 0);
        write(&mut t, 0x24, 1);
        write(&mut t, 0x20, 1 | 2);
        write(
            &mut t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(read(&mut t, 0x70) & status::FEATURES_OK, 0);
    }

    #[test]
    fn invalid_queue_setup_sets_needs_reset() {
        let (mem, probe, mut t) = setup();
        let q0 = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        let q1 = MockSplitQueue::create(&mem, GuestAddress(0x2000), 16);
        // Ring past the end of guest memory.
        bring_up(&mut t, 1 << VIRTIO_F_VERSION_1, &[&q0, &q1]);
        write(&mut t, 0x70, 0);
        write(&mut t, 0x70, 1);
        write(&mut t, 0x70, 3);
        write(&mut t, 0x24, 1);
        write(&mut t, 0x20, 1);
        write(&mut t, 0x70, 11);
        for i in 0..2 {
            write(&mut t, 0x30, i);
            write(&mut t, 0x38, 16);
            write(&mut t, 0x80, 0xfff_0000);
            write(&mut t, 0x44, 1);
        }
        write(&mut t, 0x70, 15);
        assert!(!probe.lock().unwrap().activated);
        assert_ne!(read(&mut t, 0x70) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(read(&mut t, 0x60), 2);
        write(&mut t, 0x64, 2);
        assert_eq!(read(&mut t, 0x60), 0);
        // Unaligned and wrong-size accesses are ignored.
        let mut b = [0u8; 2];
        t.read(0x02, &mut b);
        t.write(0x70, &[0]);
        assert_ne!(read(&mut t, 0x70), 0);
    }
}
