//! The balloon driven through the virtio-mmio transport as Linux's driver does, with report
//! chains built in ordinary guest memory.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{Balloon, BalloonMetrics, QUEUE_SIZES, REPORTING_QUEUE, VIRTIO_BALLOON_F_REPORTING};
use crate::devices::virtio::mmio::test_driver::{bring_up, chain, read, write};
use crate::devices::virtio::{IrqLine, MmioTransport, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::BusDevice;
use crate::vstate::memory::{create_guest_memory, Backing};

const MIB: u64 = 1 << 20;
/// Where the tests' "free" memory starts: above the queues.
const FREE: u64 = 4 * MIB;

struct Rig<'a> {
    mem: &'a GuestMemoryMmap,
    queues: Vec<MockSplitQueue<'a, GuestMemoryMmap>>,
    transport: MmioTransport,
    irq: Arc<IrqLine>,
    metrics: Arc<BalloonMetrics>,
    next_desc: [u16; 3],
    used_seen: [u16; 3],
}

fn rig(mem: &GuestMemoryMmap) -> Rig<'_> {
    let dev = Balloon::new();
    let metrics = dev.metrics();
    let features = dev.avail_features();
    assert_eq!(
        features,
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BALLOON_F_REPORTING)
    );
    let irq = IrqLine::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let mut transport = MmioTransport::new(mem.clone(), Box::new(dev), irq.clone()).unwrap();
    assert_eq!(read(&mut transport, 0x08), 5, "device id");
    let queues: Vec<_> = QUEUE_SIZES
        .iter()
        .enumerate()
        .map(|(i, &size)| {
            MockSplitQueue::create(mem, GuestAddress(0x1_0000 * (i as u64 + 1)), size)
        })
        .collect();
    let refs: Vec<_> = queues.iter().collect();
    bring_up(&mut transport, features, &refs);
    assert!(transport.device().is_activated());
    Rig {
        mem,
        queues,
        transport,
        irq,
        metrics,
        next_desc: [0; 3],
        used_seen: [0; 3],
    }
}

/// (address, length, device-writable)
type Desc = (u64, u32, bool);

impl Rig<'_> {
    /// Puts one chain on queue `q`, notifies, checks it came back used with length 0.
    fn submit(&mut self, q: usize, descs: &[Desc]) {
        let start = self.next_desc[q];
        self.queues[q]
            .add_desc_chains(&chain(start, descs, None), start)
            .unwrap();
        self.next_desc[q] += descs.len() as u16;
        self.irq.ack(u32::MAX);
        self.transport.device_mut().process_queue(q);
        let used = self.queues[q].used();
        assert_eq!(used.idx().load(), self.used_seen[q] + 1, "one used entry");
        let size = QUEUE_SIZES[q];
        let e = used
            .ring()
            .ref_at(usize::from(self.used_seen[q] % size))
            .unwrap()
            .load();
        self.used_seen[q] += 1;
        assert_eq!(e.id(), u32::from(start));
        assert_eq!(e.len(), 0, "nothing is written");
        assert_eq!(self.irq.status(), 1, "used-buffer interrupt");
    }

    fn fill(&self) {
        self.mem
            .write_slice(&vec![0xa5u8; (8 * MIB) as usize], GuestAddress(FREE))
            .unwrap();
    }

    fn byte(&self, addr: u64) -> u8 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    fn count(&self, f: impl Fn(&BalloonMetrics) -> &std::sync::atomic::AtomicU64) -> u64 {
        f(&self.metrics).load(Ordering::Relaxed)
    }
}

const W: bool = true;

#[test]
fn reported_ranges_are_given_back_and_read_as_zero() {
    for backing in [Backing::Private, Backing::Shared] {
        let mem = create_guest_memory(16 * MIB, backing).unwrap();
        let mut r = rig(&mem);
        r.fill();
        r.submit(
            REPORTING_QUEUE,
            &[(FREE, (2 * MIB) as u32, W), (FREE + 3 * MIB, MIB as u32, W)],
        );
        for (addr, want) in [
            (FREE, 0),
            (FREE + 2 * MIB - 1, 0),
            (FREE + 2 * MIB, 0xa5),
            (FREE + 3 * MIB, 0),
            (FREE + 4 * MIB - 1, 0),
            (FREE + 4 * MIB, 0xa5),
        ] {
            assert_eq!(r.byte(addr), want, "{backing:?} at {addr:#x}");
        }
        assert_eq!(r.count(|m| &m.reports), 1);
        assert_eq!(r.count(|m| &m.reported_ranges), 2);
        assert_eq!(r.count(|m| &m.discarded_bytes), 3 * MIB);
        assert_eq!(r.count(|m| &m.invalid_descriptors), 0);
    }
}

#[test]
fn malformed_reports_change_nothing() {
    let mem = create_guest_memory(16 * MIB, Backing::Private).unwrap();
    let mut r = rig(&mem);
    r.fill();
    let bad: [&[Desc]; 4] = [
        // Readable: the wrong direction for a report.
        &[(FREE, MIB as u32, false)],
        // A good range followed by one outside guest memory: the whole report is dropped.
        &[(FREE, MIB as u32, W), (64 * MIB, MIB as u32, W)],
        // Zero length.
        &[(FREE, MIB as u32, W), (FREE + MIB, 0, W)],
        // Ends past the last byte of RAM.
        &[(16 * MIB - 4096, 8192, W)],
    ];
    for (i, descs) in bad.iter().enumerate() {
        r.submit(REPORTING_QUEUE, descs);
        assert_eq!(
            r.count(|m| &m.invalid_descriptors),
            i as u64 + 1,
            "case {i}"
        );
    }
    // A chain that loops: its head points at itself.
    let start = r.next_desc[REPORTING_QUEUE];
    r.queues[REPORTING_QUEUE]
        .add_desc_chains(&chain(start, &[(FREE, MIB as u32, W)], Some(start)), start)
        .unwrap();
    r.next_desc[REPORTING_QUEUE] += 1;
    r.transport.device_mut().process_queue(REPORTING_QUEUE);
    assert_eq!(r.count(|m| &m.invalid_descriptors), 5);
    assert_eq!(r.count(|m| &m.discarded_bytes), 0);
    assert_eq!(r.byte(FREE), 0xa5);
    assert_eq!(r.byte(FREE + MIB), 0xa5);
    assert_eq!(r.byte(16 * MIB - 1), 0);
}

#[test]
fn inflate_and_deflate_buffers_come_back_untouched() {
    let mem = create_guest_memory(16 * MIB, Backing::Private).unwrap();
    let mut r = rig(&mem);
    r.fill();
    // Page frame numbers of the "inflated" pages, as Linux would send them.
    let pfns: Vec<u8> = ((FREE >> 12) as u32..(FREE >> 12) as u32 + 16)
        .flat_map(u32::to_le_bytes)
        .collect();
    mem.write_slice(&pfns, GuestAddress(0x8000)).unwrap();
    r.submit(0, &[(0x8000, pfns.len() as u32, false)]);
    r.submit(1, &[(0x8000, pfns.len() as u32, false)]);
    assert_eq!(r.count(|m| &m.unexpected_buffers), 2);
    assert_eq!(r.count(|m| &m.discarded_bytes), 0);
    assert_eq!(r.byte(FREE), 0xa5);
    // A queue index that does not exist is ignored.
    r.transport.device_mut().process_queue(7);
}

#[test]
fn config_space_asks_for_nothing_and_keeps_actual() {
    let mem = create_guest_memory(16 * MIB, Backing::Private).unwrap();
    let mut r = rig(&mem);
    let mut cfg = [0xffu8; 8];
    r.transport.read(0x100, &mut cfg);
    assert_eq!(cfg, [0; 8], "num_pages 0, actual 0");
    write(&mut r.transport, 0x104, 7);
    assert_eq!(read(&mut r.transport, 0x104), 7);
    // num_pages is not the driver's to write; odd sizes and offsets are ignored.
    write(&mut r.transport, 0x100, 9);
    r.transport.write(0x105, &[1, 2]);
    assert_eq!(read(&mut r.transport, 0x100), 0);
    assert_eq!(read(&mut r.transport, 0x104), 7);
    let metrics = r.transport.device().metrics_json();
    assert_eq!(metrics["actual_pages"], 7);
}

#[test]
fn a_driver_without_reporting_gets_no_device() {
    let mem = create_guest_memory(16 * MIB, Backing::Private).unwrap();
    let dev = Balloon::new();
    let irq = IrqLine::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let mut transport = MmioTransport::new(mem.clone(), Box::new(dev), irq).unwrap();
    let queues: Vec<_> = QUEUE_SIZES
        .iter()
        .enumerate()
        .map(|(i, &size)| {
            MockSplitQueue::create(&mem, GuestAddress(0x1_0000 * (i as u64 + 1)), size)
        })
        .collect();
    let refs: Vec<_> = queues.iter().collect();
    bring_up(&mut transport, 1 << VIRTIO_F_VERSION_1, &refs);
    assert!(!transport.device().is_activated());
    assert_ne!(read(&mut transport, 0x70) & 64, 0, "DEVICE_NEEDS_RESET");
}
