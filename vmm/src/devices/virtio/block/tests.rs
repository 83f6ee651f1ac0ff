//! The block device driven through the virtio-mmio transport the way Linux's driver does,
//! with request chains built in ordinary memory and a real backing file.

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::request::{req_type, status};
use super::{Block, BlockMetrics, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO};
use crate::devices::virtio::mmio::test_driver::{bring_up, chain, read};
use crate::devices::virtio::{IrqLine, MmioTransport, VirtioDevice};

const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x11_0000;
const STATUS: u64 = 0x20_0000;

struct Rig<'a> {
    mem: &'a GuestMemoryMmap,
    queue: MockSplitQueue<'a, GuestMemoryMmap>,
    transport: MmioTransport,
    metrics: Arc<BlockMetrics>,
    next_desc: u16,
    used_seen: u16,
    _file: tempfile::NamedTempFile,
}

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
}

fn rig(mem: &GuestMemoryMmap, read_only: bool) -> Rig<'_> {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    let mut image = vec![0u8; 64 * 512];
    for (i, b) in image.iter_mut().enumerate() {
        *b = (i / 512) as u8;
    }
    file.write_all(&image).unwrap();
    let dev = Block::new(file.path(), read_only).unwrap();
    let metrics = dev.metrics();
    let features = dev.avail_features();
    assert_ne!(features & (1 << VIRTIO_BLK_F_FLUSH), 0);
    assert_eq!(features & (1 << VIRTIO_BLK_F_RO) != 0, read_only);
    let irq = IrqLine::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let mut transport = MmioTransport::new(mem.clone(), Box::new(dev), irq).unwrap();
    assert_eq!(read(&mut transport, 0x08), 2);
    let queue = MockSplitQueue::create(mem, GuestAddress(0x1_0000), 256);
    bring_up(&mut transport, features, &[&queue]);
    assert!(transport.device().is_activated());
    // Config space: capacity in sectors.
    let mut cap = [0u8; 8];
    crate::devices::BusDevice::read(&mut transport, 0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 64);
    Rig {
        mem,
        queue,
        transport,
        metrics,
        next_desc: 0,
        used_seen: 0,
        _file: file,
    }
}

/// (address, length, device-writable)
type Desc = (u64, u32, bool);

impl Rig<'_> {
    /// Submits one chain, runs the device, returns (used length, status byte at STATUS).
    fn submit(&mut self, descs: &[Desc]) -> (u32, u8) {
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let start = self.next_desc;
        let raws = chain(start, descs, None);
        self.queue.add_desc_chains(&raws, start).unwrap();
        self.next_desc += descs.len() as u16;
        self.transport.device_mut().process_queue(0);
        let used = self.queue.used();
        assert_eq!(used.idx().load(), self.used_seen + 1, "one used entry");
        let e = used
            .ring()
            .ref_at(usize::from(self.used_seen % 256))
            .unwrap()
            .load();
        self.used_seen += 1;
        assert_eq!(e.id(), u32::from(start));
        (e.len(), self.mem.read_obj(GuestAddress(STATUS)).unwrap())
    }

    fn header(&self, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    }

    fn read_sectors(&mut self, sector: u64, split: &[u32]) -> (u32, u8, Vec<u8>) {
        self.header(req_type::IN, sector);
        let mut descs = vec![(HDR, 16, false)];
        let mut addr = DATA;
        for l in split {
            descs.push((addr, *l, true));
            addr += u64::from(*l);
        }
        descs.push((STATUS, 1, true));
        let (len, st) = self.submit(&descs);
        let mut data = vec![0u8; (addr - DATA) as usize];
        self.mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
        (len, st, data)
    }
}

#[test]
fn reads_writes_and_flushes_with_any_chain_shape() {
    let m = mem();
    let mut r = rig(&m, false);
    // One data descriptor.
    let (len, st, data) = r.read_sectors(3, &[1024]);
    assert_eq!((len, st), (1025, status::OK));
    assert!(data[..512].iter().all(|b| *b == 3) && data[512..].iter().all(|b| *b == 4));
    // Header and data in one descriptor (write), data split across three (read back).
    let mut req = vec![0u8; 16 + 1024];
    req[..4].copy_from_slice(&req_type::OUT.to_le_bytes());
    req[8..16].copy_from_slice(&10u64.to_le_bytes());
    req[16..].fill(0xab);
    m.write_slice(&req, GuestAddress(HDR)).unwrap();
    let (len, st) = r.submit(&[(HDR, req.len() as u32, false), (STATUS, 1, true)]);
    assert_eq!((len, st), (1, status::OK));
    let (len, st, data) = r.read_sectors(10, &[100, 412, 512]);
    assert_eq!((len, st), (1025, status::OK));
    assert!(data.iter().all(|b| *b == 0xab));
    // Flush.
    r.header(req_type::FLUSH, 0);
    assert_eq!(
        r.submit(&[(HDR, 16, false), (STATUS, 1, true)]),
        (1, status::OK)
    );
    let m = &r.metrics;
    assert_eq!(m.reads.load(Ordering::Relaxed), 2);
    assert_eq!(m.read_bytes.load(Ordering::Relaxed), 2048);
    assert_eq!(m.writes.load(Ordering::Relaxed), 1);
    assert_eq!(m.write_bytes.load(Ordering::Relaxed), 1024);
    assert_eq!(m.flushes.load(Ordering::Relaxed), 1);
    assert_eq!(m.queue_events.load(Ordering::Relaxed), 4);
}

#[test]
fn bad_requests_get_an_error_status() {
    let m = mem();
    let mut r = rig(&m, true);
    // Write to a read-only disk.
    r.header(req_type::OUT, 0);
    let st = r.submit(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]);
    assert_eq!(st, (1, status::IOERR));
    // Past the end, straddling the end, overflowing sector arithmetic, partial sector.
    for (sector, len) in [(64, 512), (63, 1024), (u64::MAX, 512), (0, 100)] {
        let (l, st, _) = r.read_sectors(sector, &[len]);
        assert_eq!((l, st), (1, status::IOERR), "sector {sector} len {len}");
    }
    // Unknown and unimplemented request types.
    for kind in [req_type::GET_ID, 0xdead] {
        r.header(kind, 0);
        let st = r.submit(&[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)]);
        assert_eq!(st, (1, status::UNSUPP));
    }
    assert_eq!(r.metrics.io_errors.load(Ordering::Relaxed), 5);
    assert_eq!(r.metrics.unsupported.load(Ordering::Relaxed), 2);
    assert_eq!(r.metrics.writes.load(Ordering::Relaxed), 0);
}

#[test]
fn malformed_chains_are_dropped_and_counted() {
    let m = mem();
    let mut r = rig(&m, false);
    r.header(req_type::IN, 0);
    let bad: [&[Desc]; 6] = [
        // No status byte.
        &[(HDR, 16, false), (DATA, 512, false)],
        // Header too short.
        &[(HDR, 8, false), (STATUS, 1, true)],
        // Writable before readable.
        &[(STATUS, 1, true), (HDR, 16, false)],
        // Zero-length data.
        &[(HDR, 16, false), (DATA, 0, true), (STATUS, 1, true)],
        // Data outside guest memory.
        &[
            (HDR, 16, false),
            (0x3f_ff00, 0x1000, true),
            (STATUS, 1, true),
        ],
        // Longer than any request we serve.
        &[(HDR, 16, false), (DATA, u32::MAX, true), (STATUS, 1, true)],
    ];
    for (i, chain) in bad.iter().enumerate() {
        let (len, st) = r.submit(chain);
        assert_eq!(len, 0, "chain {i}");
        assert_eq!(st, 0xff, "chain {i}: no status may be written");
    }
    assert_eq!(
        r.metrics.invalid_descriptors.load(Ordering::Relaxed),
        bad.len() as u64
    );
    // The device still works afterwards.
    let (len, st, _) = r.read_sectors(0, &[512]);
    assert_eq!((len, st), (513, status::OK));
}
