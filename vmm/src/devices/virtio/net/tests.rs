//! The net device driven through the virtio-mmio transport the way Linux's driver does, with
//! descriptor chains of every shape built in ordinary memory, and a unix datagram socket
//! pair in place of the tap (one datagram = one frame, vnet header first, like a tap queue).

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::features::*;
use super::tap::NetBackend;
use super::{Net, NetMetrics, MAX_TX_CHAIN_LEN, RXQ, TXQ, VNET_HDR_LEN};
use crate::devices::virtio::mmio::test_driver::{bring_up, chain, read};
use crate::devices::virtio::{IrqLine, MmioTransport, VIRTIO_F_VERSION_1};

const QSIZE: u16 = 256;
const GUEST_MAC: [u8; 6] = [2, 0xca, 0xfe, 0, 0, 2];
const MEM_SIZE: u64 = 0x100_0000;

type Mock<'a> = MockSplitQueue<'a, GuestMemoryMmap>;

/// The "tap": the device's end of a datagram socket pair, plus what the test can observe.
struct PairBackend {
    sock: UnixDatagram,
    offloads: Arc<Mutex<Vec<u32>>>,
    fail_writes: Arc<AtomicBool>,
}

impl NetBackend for PairBackend {
    fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.sock.recv(buf)
    }
    fn write_frame(&mut self, iovs: &[libc::iovec]) -> std::io::Result<usize> {
        if self.fail_writes.load(Ordering::SeqCst) {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        // One datagram per writev, as one frame per write on a tap.
        super::tap::writev(self.sock.as_raw_fd(), iovs)
    }
    fn set_offload(&mut self, flags: u32) -> std::io::Result<()> {
        self.offloads.lock().unwrap().push(flags);
        Ok(())
    }
    fn raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

/// One descriptor of a chain to build: (length, device-writable), or raw fields.
#[derive(Clone, Copy)]
enum D {
    Buf(u32, bool),
    Raw { addr: u64, len: u32, write: bool },
}

/// A guest driver with the device behind the transport and the host end of the "tap".
struct Rig<'a> {
    mem: &'a GuestMemoryMmap,
    queues: [Mock<'a>; 2],
    next_desc: [u16; 2],
    used_seen: [u16; 2],
    next_buf: u64,
    transport: MmioTransport,
    irq: Arc<IrqLine>,
    host: UnixDatagram,
    metrics: Arc<NetMetrics>,
    offloads: Arc<Mutex<Vec<u32>>>,
    fail_writes: Arc<AtomicBool>,
}

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

fn rig(mem: &GuestMemoryMmap, features: u64, mtu: Option<u16>) -> Rig<'_> {
    let (dev_end, host) = UnixDatagram::pair().unwrap();
    dev_end.set_nonblocking(true).unwrap();
    host.set_nonblocking(true).unwrap();
    let offloads = Arc::new(Mutex::new(Vec::new()));
    let fail_writes = Arc::new(AtomicBool::new(false));
    let backend = PairBackend {
        sock: dev_end,
        offloads: offloads.clone(),
        fail_writes: fail_writes.clone(),
    };
    let dev = Net::with_backend(Box::new(backend), GUEST_MAC, mtu).unwrap();
    let metrics = dev.metrics();
    let irq = IrqLine::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let mut transport = MmioTransport::new(mem.clone(), Box::new(dev), irq.clone()).unwrap();
    assert_eq!(read(&mut transport, 0x08), 1, "device id");
    let q = |i: u64| MockSplitQueue::create(mem, GuestAddress(0x1_0000 * (i + 1)), QSIZE);
    let queues = [q(0), q(1)];
    let qs: Vec<&Mock<'_>> = queues.iter().collect();
    bring_up(&mut transport, features, &qs);
    assert!(transport.device().is_activated());
    Rig {
        mem,
        queues,
        next_desc: [0; 2],
        used_seen: [0; 2],
        next_buf: 0x10_0000,
        transport,
        irq,
        host,
        metrics,
        offloads,
        fail_writes,
    }
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
}

/// Whether the device's backend fd (its own epoll set) reports the tap readable.
fn backend_ready(t: &MmioTransport) -> bool {
    let mut p = libc::pollfd {
        fd: t.device().backend_fd().unwrap(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 1
}

impl Rig<'_> {
    fn alloc(&mut self, len: u32) -> u64 {
        let a = self.next_buf;
        self.next_buf += (u64::from(len.max(1)) + 0xfff) & !0xfff;
        assert!(self.next_buf < MEM_SIZE, "test ran out of guest memory");
        a
    }

    /// Adds a chain to queue `q`; returns the head index and each descriptor's address. With
    /// `link_to`, the last descriptor points to that index instead of ending the chain.
    fn add(&mut self, q: usize, descs: &[D], link_to: Option<u16>) -> (u16, Vec<u64>) {
        let start = self.next_desc[q];
        let mut parts = Vec::new();
        let mut addrs = Vec::new();
        for d in descs {
            let (addr, len, w) = match *d {
                D::Buf(len, w) => (self.alloc(len), len, w),
                D::Raw { addr, len, write } => (addr, len, write),
            };
            parts.push((addr, len, w));
            addrs.push(addr);
        }
        let raws = chain(start, &parts, link_to);
        self.queues[q].add_desc_chains(&raws, start).unwrap();
        self.next_desc[q] = start + descs.len() as u16;
        (start, addrs)
    }

    /// Used entries published since the last call: (descriptor head, length).
    fn take_used(&mut self, q: usize) -> Vec<(u32, u32)> {
        let used = self.queues[q].used();
        let idx = used.idx().load();
        let mut out = Vec::new();
        while self.used_seen[q] != idx {
            let e = used
                .ring()
                .ref_at(usize::from(self.used_seen[q] % QSIZE))
                .unwrap()
                .load();
            out.push((e.id(), e.len()));
            self.used_seen[q] = self.used_seen[q].wrapping_add(1);
        }
        out
    }

    /// Puts `bytes` on the TX queue split as `split` says and notifies; returns the head.
    fn transmit(&mut self, bytes: &[u8], split: &[u32]) -> u16 {
        assert_eq!(split.iter().sum::<u32>() as usize, bytes.len());
        let descs: Vec<D> = split.iter().map(|l| D::Buf(*l, false)).collect();
        let (head, addrs) = self.add(TXQ, &descs, None);
        let mut off = 0;
        for (a, l) in addrs.iter().zip(split) {
            self.mem
                .write_slice(&bytes[off..off + *l as usize], GuestAddress(*a))
                .unwrap();
            off += *l as usize;
        }
        self.transport.device_mut().process_queue(TXQ);
        head
    }

    /// Offers a receive chain of writable buffers of these sizes; returns head and addresses.
    fn offer_rx(&mut self, split: &[u32]) -> (u16, Vec<u64>) {
        let descs: Vec<D> = split.iter().map(|l| D::Buf(*l, true)).collect();
        self.add(RXQ, &descs, None)
    }

    /// Reads `len` bytes scattered over buffers `addrs` of sizes `split`.
    fn gather(&self, addrs: &[u64], split: &[u32], len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for (a, l) in addrs.iter().zip(split) {
            let take = (len - out.len()).min(*l as usize);
            let mut buf = vec![0u8; take];
            self.mem.read_slice(&mut buf, GuestAddress(*a)).unwrap();
            out.extend_from_slice(&buf);
        }
        out
    }

    fn host_recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 70_000];
        match self.host.recv(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                Some(buf)
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
            Err(e) => panic!("host recv: {e}"),
        }
    }

    fn interrupted(&self) -> bool {
        let raised = self.irq.status() & 1 != 0;
        let _ = self.irq.evt().read();
        self.irq.ack(1);
        raised
    }

    /// Sets the flags of queue `q`'s available ring (bit 0: `VRING_AVAIL_F_NO_INTERRUPT`).
    fn set_avail_flags(&self, q: usize, flags: u16) {
        self.mem
            .write_obj(flags, self.queues[q].avail_addr())
            .unwrap();
    }

    /// The flags of queue `q`'s used ring (bit 0: `VRING_USED_F_NO_NOTIFY`).
    fn used_flags(&self, q: usize) -> u16 {
        self.mem.read_obj(self.queues[q].used_addr()).unwrap()
    }

    fn count(&self, f: impl Fn(&NetMetrics) -> &std::sync::atomic::AtomicU64) -> u64 {
        f(&self.metrics).load(Ordering::Relaxed)
    }
}

const ALL_OFFLOADS: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << CSUM)
    | (1 << GUEST_CSUM)
    | (1 << GUEST_TSO4)
    | (1 << GUEST_TSO6)
    | (1 << GUEST_UFO)
    | (1 << HOST_TSO4)
    | (1 << HOST_TSO6)
    | (1 << HOST_UFO);

#[test]
fn features_and_config_space() {
    let m = mem();
    let mut r = rig(&m, 1 << VIRTIO_F_VERSION_1, Some(1400));
    let f = r.transport.device().avail_features();
    for bit in [VIRTIO_F_VERSION_1, MAC, STATUS, MTU, MRG_RXBUF] {
        assert_ne!(f & (1 << bit), 0, "feature {bit}");
    }
    assert_eq!(f & ALL_OFFLOADS, ALL_OFFLOADS);
    let mut cfg = [0u8; 12];
    crate::devices::BusDevice::read(&mut r.transport, 0x100, &mut cfg);
    assert_eq!(&cfg[..6], &GUEST_MAC);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1, "link up");
    assert_eq!(u16::from_le_bytes([cfg[8], cfg[9]]), 1, "one queue pair");
    assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 1400, "mtu");
    // Reads past the end are zero, byte-wise reads work.
    let mut b = [0xffu8; 2];
    crate::devices::BusDevice::read(&mut r.transport, 0x100 + 11, &mut b);
    assert_eq!(b, [5, 0]);
    // Without an MTU, no MTU feature.
    let m2 = mem();
    let r2 = rig(&m2, 1 << VIRTIO_F_VERSION_1, None);
    assert_eq!(r2.transport.device().avail_features() & (1 << MTU), 0);
}

#[test]
fn offloads_follow_what_the_guest_acked() {
    for (features, want) in [
        (1 << VIRTIO_F_VERSION_1, 0),
        (
            ALL_OFFLOADS,
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_UFO,
        ),
        (
            (1 << VIRTIO_F_VERSION_1) | (1 << GUEST_CSUM) | (1 << GUEST_TSO4),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4,
        ),
        // TSO without checksum offload is not a valid combination: nothing is enabled.
        ((1 << VIRTIO_F_VERSION_1) | (1 << GUEST_TSO4), 0),
        // Host-side offloads need nothing from the tap.
        (
            (1 << VIRTIO_F_VERSION_1) | (1 << CSUM) | (1 << HOST_TSO4),
            0,
        ),
    ] {
        let m = mem();
        let mut r = rig(&m, features, None);
        assert_eq!(
            *r.offloads.lock().unwrap(),
            vec![want],
            "features {features:#x}"
        );
        // A reset turns them off again.
        crate::devices::virtio::mmio::test_driver::write(&mut r.transport, 0x70, 0);
        assert!(!r.transport.device().is_activated());
        assert_eq!(r.offloads.lock().unwrap().last(), Some(&0));
    }
}

#[test]
fn tx_frames_reach_the_tap_with_every_chain_shape() {
    let m = mem();
    let mut r = rig(&m, ALL_OFFLOADS, None);
    let shapes: [&[u32]; 4] = [
        // Header separate, frame in one.
        &[12, 1514],
        // Header and frame in one descriptor.
        &[1526],
        // Split everywhere, the header across two descriptors.
        &[5, 7, 100, 1, 1413],
        // A 64 KiB TSO frame.
        &[12, 32768, 32768 + 17],
    ];
    let mut sent_bytes = 0;
    for (i, split) in shapes.iter().enumerate() {
        let len: u32 = split.iter().sum();
        let bytes = frame(len as usize, i as u8);
        let head = r.transmit(&bytes, split);
        assert_eq!(r.take_used(TXQ), vec![(u32::from(head), 0)], "shape {i}");
        assert!(r.interrupted(), "shape {i}: used-buffer interrupt");
        assert_eq!(r.host_recv().as_deref(), Some(&bytes[..]), "shape {i}");
        sent_bytes += len as u64 - VNET_HDR_LEN as u64;
    }
    assert_eq!(r.host_recv(), None);
    assert_eq!(r.count(|m| &m.tx_packets), shapes.len() as u64);
    assert_eq!(r.count(|m| &m.tx_bytes), sent_bytes);
    assert_eq!(r.count(|m| &m.invalid_descriptors), 0);
    // Several chains in one notification go out in order.
    let a = frame(100, 0xa);
    let b = frame(200, 0xb);
    let descs = [D::Buf(100, false)];
    let (_, aa) = r.add(TXQ, &descs, None);
    let (_, ba) = r.add(TXQ, &[D::Buf(200, false)], None);
    m.write_slice(&a, GuestAddress(aa[0])).unwrap();
    m.write_slice(&b, GuestAddress(ba[0])).unwrap();
    r.transport.device_mut().process_queue(TXQ);
    assert_eq!(r.take_used(TXQ).len(), 2);
    assert_eq!(r.host_recv(), Some(a));
    assert_eq!(r.host_recv(), Some(b));
}

#[test]
fn malformed_tx_chains_are_dropped_and_counted() {
    let m = mem();
    let mut r = rig(&m, 1 << VIRTIO_F_VERSION_1, None);
    let bad: Vec<(&str, Vec<D>, Option<u16>)> = vec![
        (
            "zero length",
            vec![D::Buf(12, false), D::Buf(0, false)],
            None,
        ),
        (
            "device-writable",
            vec![D::Buf(12, false), D::Buf(100, true)],
            None,
        ),
        (
            "outside memory",
            vec![
                D::Buf(12, false),
                D::Raw {
                    addr: MEM_SIZE - 10,
                    len: 100,
                    write: false,
                },
            ],
            None,
        ),
        (
            "address overflow",
            vec![D::Raw {
                addr: u64::MAX - 4,
                len: 100,
                write: false,
            }],
            None,
        ),
        (
            "oversized",
            vec![D::Buf(12, false), D::Buf(MAX_TX_CHAIN_LEN as u32, false)],
            None,
        ),
        ("shorter than headers", vec![D::Buf(12 + 13, false)], None),
    ];
    let n = bad.len() as u64;
    for (what, descs, link) in bad {
        let (head, _) = r.add(TXQ, &descs, link);
        r.transport.device_mut().process_queue(TXQ);
        assert_eq!(r.take_used(TXQ), vec![(u32::from(head), 0)], "{what}");
        assert_eq!(r.host_recv(), None, "{what}: nothing reaches the tap");
    }
    // A loop: the last descriptor points back to the first.
    let start = r.next_desc[TXQ];
    let (head, _) = r.add(TXQ, &[D::Buf(12, false), D::Buf(100, false)], Some(start));
    r.transport.device_mut().process_queue(TXQ);
    assert_eq!(r.take_used(TXQ), vec![(u32::from(head), 0)], "loop");
    // A `next` past the table.
    let (head, _) = r.add(TXQ, &[D::Buf(200, false)], Some(QSIZE + 5));
    r.transport.device_mut().process_queue(TXQ);
    assert_eq!(
        r.take_used(TXQ),
        vec![(u32::from(head), 0)],
        "next out of table"
    );
    assert_eq!(r.host_recv(), None);
    assert_eq!(r.count(|m| &m.invalid_descriptors), n + 2);
    assert_eq!(r.count(|m| &m.tx_packets), 0);
    // The device still works.
    let ok = frame(60, 1);
    r.transmit(&ok, &[60]);
    assert_eq!(r.host_recv(), Some(ok));
}

#[test]
fn rx_frames_reach_the_guest_with_every_chain_shape() {
    let m = mem();
    let mut r = rig(&m, 1 << VIRTIO_F_VERSION_1, None);
    let shapes: [&[u32]; 3] = [&[12, 1514], &[1526], &[4, 8, 3, 1511]];
    let mut got_bytes = 0;
    for (i, split) in shapes.iter().enumerate() {
        let (head, addrs) = r.offer_rx(split);
        r.transport.device_mut().process_queue(RXQ);
        assert!(r.take_used(RXQ).is_empty(), "no frame yet");
        let mut bytes = frame(600 + i * 100, i as u8);
        // The tap's header: DATA_VALID set, num_buffers not written by the tap.
        bytes[0] = 2;
        bytes[10] = 0x77;
        bytes[11] = 0x77;
        r.host.send(&bytes).unwrap();
        assert!(
            backend_ready(&r.transport),
            "shape {i}: the tap wakes the loop"
        );
        r.transport.device_mut().process_backend();
        assert_eq!(
            r.take_used(RXQ),
            vec![(u32::from(head), bytes.len() as u32)],
            "shape {i}"
        );
        assert!(r.interrupted(), "shape {i}: used-buffer interrupt");
        let got = r.gather(&addrs, split, bytes.len());
        // Without GUEST_CSUM the flags are cleared; num_buffers is 1.
        assert_eq!(got[0], 0, "shape {i}: flags");
        assert_eq!(&got[10..12], &[1, 0], "shape {i}: num_buffers");
        assert_eq!(&got[1..10], &bytes[1..10], "shape {i}: rest of the header");
        assert_eq!(&got[12..], &bytes[12..], "shape {i}: frame");
        got_bytes += (bytes.len() - VNET_HDR_LEN) as u64;
    }
    assert!(!backend_ready(&r.transport), "tap drained");
    assert_eq!(r.count(|m| &m.rx_packets), shapes.len() as u64);
    assert_eq!(r.count(|m| &m.rx_bytes), got_bytes);
}

#[test]
fn rx_header_flags_pass_with_guest_csum_and_big_frames_fit_big_buffers() {
    let m = mem();
    let mut r = rig(&m, ALL_OFFLOADS, None);
    // Linux's "big packets" receive buffer: header, then 17 pages.
    let mut split = vec![12u32];
    split.extend(std::iter::repeat_n(4096, 17));
    let (head, addrs) = r.offer_rx(&split);
    let mut bytes = frame(VNET_HDR_LEN + 65535 + 14, 9);
    bytes[0] = 1; // NEEDS_CSUM
    bytes[1] = 1; // GSO TCPv4
    r.host.send(&bytes).unwrap();
    r.transport.device_mut().process_backend();
    assert_eq!(
        r.take_used(RXQ),
        vec![(u32::from(head), bytes.len() as u32)]
    );
    let got = r.gather(&addrs, &split, bytes.len());
    assert_eq!(&got[..2], &[1, 1], "flags and gso_type kept");
    assert_eq!(&got[12..], &bytes[12..]);
}

#[test]
fn frames_too_big_for_the_buffer_are_dropped_and_the_buffer_kept() {
    let m = mem();
    let mut r = rig(&m, 1 << VIRTIO_F_VERSION_1, None);
    let (head, addrs) = r.offer_rx(&[12, 200]);
    let big = frame(1000, 1);
    let small = frame(150, 2);
    r.host.send(&big).unwrap();
    r.host.send(&small).unwrap();
    // A runt shorter than a vnet header and an Ethernet header is dropped too.
    r.host.send(&frame(20, 3)).unwrap();
    r.transport.device_mut().process_backend();
    assert_eq!(r.take_used(RXQ), vec![(u32::from(head), 150)]);
    assert_eq!(&r.gather(&addrs, &[12, 200], 150)[12..], &small[12..]);
    r.offer_rx(&[1526]);
    r.transport.device_mut().process_queue(RXQ);
    assert!(
        r.take_used(RXQ).is_empty(),
        "the runt never reaches the guest"
    );
    assert_eq!(r.count(|m| &m.rx_dropped), 2);
    assert_eq!(r.count(|m| &m.rx_packets), 1);
}

#[test]
fn malformed_rx_chains_are_returned_empty_and_the_frame_waits() {
    let m = mem();
    let mut r = rig(&m, 1 << VIRTIO_F_VERSION_1, None);
    let f = frame(300, 4);
    r.host.send(&f).unwrap();
    let mut heads = Vec::new();
    for descs in [
        vec![D::Buf(1526, false)],
        vec![D::Buf(12, true), D::Buf(0, true)],
        vec![D::Raw {
            addr: MEM_SIZE - 100,
            len: 1526,
            write: true,
        }],
    ] {
        heads.push(r.add(RXQ, &descs, None).0);
    }
    let start = r.next_desc[RXQ];
    heads.push(
        r.add(RXQ, &[D::Buf(12, true), D::Buf(1514, true)], Some(start))
            .0,
    );
    r.transport.device_mut().process_backend();
    let want: Vec<(u32, u32)> = heads.iter().map(|h| (u32::from(*h), 0)).collect();
    assert_eq!(r.take_used(RXQ), want);
    assert_eq!(r.count(|m| &m.invalid_descriptors), 4);
    assert_eq!(r.count(|m| &m.rx_packets), 0);
    // The frame was kept for the next good buffer.
    let (head, addrs) = r.offer_rx(&[1526]);
    r.transport.device_mut().process_queue(RXQ);
    assert_eq!(r.take_used(RXQ), vec![(u32::from(head), 300)]);
    assert_eq!(&r.gather(&addrs, &[1526], 300)[12..], &f[12..]);
}

#[test]
fn no_rx_buffers_means_backpressure_not_buffering_or_spinning() {
    let m = mem();
    let mut r = rig(&m, 1 << VIRTIO_F_VERSION_1, None);
    let frames: Vec<Vec<u8>> = (0..3).map(|i| frame(100 + i, i as u8)).collect();
    for f in &frames {
        r.host.send(f).unwrap();
    }
    assert!(backend_ready(&r.transport));
    r.transport.device_mut().process_backend();
    // One frame taken and held; the tap is no longer watched although it is readable.
    assert_eq!(r.count(|m| &m.rx_no_buffers), 1);
    assert!(!backend_ready(&r.transport), "the event loop must not spin");
    // One buffer: the held frame goes in, the next is held again.
    let (h0, a0) = r.offer_rx(&[1526]);
    r.transport.device_mut().process_queue(RXQ);
    assert_eq!(r.take_used(RXQ), vec![(u32::from(h0), 100)]);
    assert_eq!(r.gather(&a0, &[1526], 100)[12..], frames[0][12..]);
    assert!(!backend_ready(&r.transport));
    assert_eq!(r.count(|m| &m.rx_no_buffers), 2);
    // Enough buffers: everything arrives in order and the tap is watched again.
    let (h1, a1) = r.offer_rx(&[1526]);
    let (h2, a2) = r.offer_rx(&[1526]);
    let (_h3, _) = r.offer_rx(&[1526]);
    r.transport.device_mut().process_queue(RXQ);
    assert_eq!(
        r.take_used(RXQ),
        vec![(u32::from(h1), 101), (u32::from(h2), 102)]
    );
    assert_eq!(r.gather(&a1, &[1526], 101)[12..], frames[1][12..]);
    assert_eq!(r.gather(&a2, &[1526], 102)[12..], frames[2][12..]);
    assert!(!backend_ready(&r.transport), "drained");
    r.host.send(&frames[0]).unwrap();
    assert!(
        backend_ready(&r.transport),
        "watched again once buffers are there"
    );
    assert_eq!(r.count(|m| &m.rx_packets), 3);
}

const MERGEABLE: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << MRG_RXBUF);

/// The `num_buffers` field of the header at the start of `addr`.
fn num_buffers(r: &Rig<'_>, addr: u64) -> u16 {
    let mut b = [0u8; 2];
    r.mem.read_slice(&mut b, GuestAddress(addr + 10)).unwrap();
    u16::from_le_bytes(b)
}

#[test]
fn mergeable_frames_spread_over_buffers_and_say_how_many() {
    let m = mem();
    let mut r = rig(&m, MERGEABLE | ALL_OFFLOADS, None);
    // Linux's mergeable buffers: one descriptor each; one here is split in two.
    let offered: Vec<(u16, Vec<u64>, Vec<u32>)> =
        [vec![1536], vec![1000, 536], vec![1536], vec![1536]]
            .into_iter()
            .map(|split| {
                let (h, a) = r.offer_rx(&split);
                (h, a, split)
            })
            .collect();
    let mut big = frame(4000, 7);
    big[0] = 1; // NEEDS_CSUM, kept with GUEST_CSUM
    r.host.send(&big).unwrap();
    r.transport.device_mut().process_backend();
    let h = |i: usize| u32::from(offered[i].0);
    assert_eq!(
        r.take_used(RXQ),
        vec![(h(0), 1536), (h(1), 1536), (h(2), 928)],
        "three buffers, in order, contiguous"
    );
    assert!(r.interrupted());
    assert_eq!(num_buffers(&r, offered[0].1[0]), 3);
    let mut got = Vec::new();
    for (i, len) in [1536, 1536, 928].into_iter().enumerate() {
        got.extend(r.gather(&offered[i].1, &offered[i].2, len));
    }
    assert_eq!(got[..10], big[..10], "header kept but for num_buffers");
    assert_eq!(got[12..], big[12..], "frame");
    // A small frame takes one buffer and says so.
    let small = frame(100, 8);
    r.host.send(&small).unwrap();
    r.transport.device_mut().process_backend();
    assert_eq!(r.take_used(RXQ), vec![(h(3), 100)]);
    assert_eq!(num_buffers(&r, offered[3].1[0]), 1);
    assert_eq!(r.count(|m| &m.rx_packets), 2);
    assert_eq!(
        r.count(|m| &m.rx_bytes),
        (4000 + 100 - 2 * VNET_HDR_LEN) as u64
    );
    assert_eq!(r.count(|m| &m.invalid_descriptors), 0);
}

#[test]
fn a_64k_frame_takes_as_many_page_sized_buffers_as_it_needs() {
    let m = mem();
    let mut r = rig(&m, MERGEABLE | ALL_OFFLOADS, None);
    let heads: Vec<(u16, Vec<u64>)> = (0..20).map(|_| r.offer_rx(&[4096])).collect();
    let mut gso = frame(VNET_HDR_LEN + 65535 + 14, 9);
    gso[0] = 1;
    gso[1] = 1; // GSO TCPv4
    r.host.send(&gso).unwrap();
    r.transport.device_mut().process_backend();
    let used = r.take_used(RXQ);
    let want = gso.len().div_ceil(4096);
    assert_eq!(used.len(), want);
    assert_eq!(num_buffers(&r, heads[0].1[0]) as usize, want);
    let mut got = Vec::new();
    for (i, (head, len)) in used.iter().enumerate() {
        assert_eq!(*head, u32::from(heads[i].0));
        got.extend(r.gather(&heads[i].1, &[4096], *len as usize));
    }
    assert_eq!(got.len(), gso.len());
    assert_eq!(got[..2], [1, 1], "flags and gso_type kept");
    assert_eq!(got[12..], gso[12..]);
}

#[test]
fn a_mergeable_frame_waits_until_the_guest_has_room_for_all_of_it() {
    let m = mem();
    let mut r = rig(&m, MERGEABLE, None);
    let (h0, a0) = r.offer_rx(&[1536]);
    let f = frame(3000, 3);
    r.host.send(&f).unwrap();
    r.transport.device_mut().process_backend();
    assert!(
        r.take_used(RXQ).is_empty(),
        "half a frame is never published"
    );
    assert_eq!(r.count(|m| &m.rx_no_buffers), 1);
    assert!(!backend_ready(&r.transport), "backpressure, no spinning");
    let (h1, a1) = r.offer_rx(&[1536]);
    r.transport.device_mut().process_queue(RXQ);
    assert_eq!(
        r.take_used(RXQ),
        vec![(u32::from(h0), 1536), (u32::from(h1), 1464)],
        "the first buffer was offered again, not lost"
    );
    assert_eq!(num_buffers(&r, a0[0]), 2);
    let mut got = r.gather(&a0, &[1536], 1536);
    got.extend(r.gather(&a1, &[1536], 1464));
    assert_eq!(got[12..], f[12..]);
}

#[test]
fn malformed_chains_around_a_mergeable_frame_are_returned_empty_before_it() {
    let m = mem();
    let mut r = rig(&m, MERGEABLE, None);
    // Leading: read-only, and shorter than a header; then good, read-only, good.
    let lead_ro = r.add(RXQ, &[D::Buf(1536, false)], None).0;
    let lead_short = r.offer_rx(&[8]).0;
    let (g0, a0) = r.offer_rx(&[1536]);
    let mid_bad = r
        .add(
            RXQ,
            &[D::Raw {
                addr: MEM_SIZE - 10,
                len: 1536,
                write: true,
            }],
            None,
        )
        .0;
    let (g1, a1) = r.offer_rx(&[1536]);
    let f = frame(2000, 5);
    r.host.send(&f).unwrap();
    r.transport.device_mut().process_backend();
    assert_eq!(
        r.take_used(RXQ),
        vec![
            (u32::from(lead_ro), 0),
            (u32::from(lead_short), 0),
            (u32::from(mid_bad), 0),
            (u32::from(g0), 1536),
            (u32::from(g1), 464),
        ]
    );
    assert_eq!(r.count(|m| &m.invalid_descriptors), 3);
    assert_eq!(num_buffers(&r, a0[0]), 2);
    let mut got = r.gather(&a0, &[1536], 1536);
    got.extend(r.gather(&a1, &[1536], 464));
    assert_eq!(got[12..], f[12..]);
}

#[test]
fn a_frame_needing_more_buffers_than_the_queue_holds_is_dropped_and_the_buffers_kept() {
    let m = mem();
    let mut r = rig(&m, MERGEABLE, None);
    // A full ring of header-sized buffers: 256 * 12 bytes cannot hold a 4000-byte frame.
    let offered: Vec<(u16, Vec<u64>)> = (0..QSIZE).map(|_| r.offer_rx(&[12])).collect();
    r.host.send(&frame(4000, 1)).unwrap();
    let small = frame(30, 2);
    r.host.send(&small).unwrap();
    r.transport.device_mut().process_backend();
    assert_eq!(r.count(|m| &m.rx_dropped), 1);
    // The next frame starts at the first buffer again: 30 bytes in 12 + 12 + 6.
    let h = |i: usize| u32::from(offered[i].0);
    assert_eq!(r.take_used(RXQ), vec![(h(0), 12), (h(1), 12), (h(2), 6)]);
    assert_eq!(num_buffers(&r, offered[0].1[0]), 3);
    let mut got = Vec::new();
    for (i, len) in [12, 12, 6].into_iter().enumerate() {
        got.extend(r.gather(&offered[i].1, &[12], len));
    }
    assert_eq!(got[12..], small[12..]);
}

#[test]
fn no_interrupt_while_the_driver_polls_the_used_ring() {
    let m = mem();
    let mut r = rig(&m, MERGEABLE, None);
    // Linux sets VRING_AVAIL_F_NO_INTERRUPT while NAPI polls.
    r.set_avail_flags(RXQ, 1);
    let (h0, _) = r.offer_rx(&[1536]);
    r.host.send(&frame(100, 1)).unwrap();
    r.transport.device_mut().process_backend();
    assert_eq!(
        r.take_used(RXQ),
        vec![(u32::from(h0), 100)],
        "used all the same"
    );
    assert!(!r.interrupted(), "no interrupt while the driver polls");
    assert_eq!(r.count(|m| &m.interrupts_suppressed), 1);
    // Interrupts back on: the next frame raises one.
    r.set_avail_flags(RXQ, 0);
    let (h1, _) = r.offer_rx(&[1536]);
    r.host.send(&frame(100, 2)).unwrap();
    r.transport.device_mut().process_backend();
    assert_eq!(r.take_used(RXQ), vec![(u32::from(h1), 100)]);
    assert!(r.interrupted());
    // The same on the transmit queue.
    r.set_avail_flags(TXQ, 1);
    r.transmit(&frame(60, 3), &[60]);
    assert!(!r.interrupted());
    assert_eq!(r.count(|m| &m.interrupts_suppressed), 2);
    r.set_avail_flags(TXQ, 0);
    r.transmit(&frame(60, 4), &[60]);
    assert!(r.interrupted());
}

#[test]
fn receive_buffer_notifications_are_asked_for_only_while_a_frame_waits() {
    let m = mem();
    let mut r = rig(&m, MERGEABLE, None);
    let no_notify = |r: &Rig<'_>| r.used_flags(RXQ) & 1 == 1;
    assert!(
        no_notify(&r),
        "the tap was empty at activation: no notifications"
    );
    r.offer_rx(&[1536]);
    r.host.send(&frame(100, 1)).unwrap();
    r.transport.device_mut().process_backend();
    assert!(
        no_notify(&r),
        "tap drained: the driver need not notify new buffers"
    );
    // A frame with no buffer left: notifications back on, the frame waits.
    r.host.send(&frame(100, 2)).unwrap();
    r.transport.device_mut().process_backend();
    assert!(!no_notify(&r), "a frame waits for a buffer");
    assert_eq!(
        r.count(|m| &m.rx_no_buffers),
        1,
        "counted once, after a second look"
    );
    assert!(
        !backend_ready(&r.transport),
        "the tap is not watched meanwhile"
    );
    let (h, _) = r.offer_rx(&[1536]);
    r.transport.device_mut().process_queue(RXQ);
    assert_eq!(r.take_used(RXQ).last(), Some(&(u32::from(h), 100)));
    assert!(no_notify(&r), "delivered and drained: off again");
}

#[test]
fn every_counter_moves() {
    let m = mem();
    let mut r = rig(&m, MERGEABLE, None);
    // tx_packets, tx_bytes, queue_events, then tx_dropped + tap_errors.
    r.transmit(&frame(60, 1), &[60]);
    r.fail_writes.store(true, Ordering::SeqCst);
    r.transmit(&frame(60, 2), &[60]);
    // invalid_descriptors.
    r.add(TXQ, &[D::Buf(60, true)], None);
    r.transport.device_mut().process_queue(TXQ);
    // rx_packets, rx_bytes, backend_events.
    r.offer_rx(&[12, 200]);
    r.host.send(&frame(100, 3)).unwrap();
    r.transport.device_mut().process_backend();
    // rx_dropped (a runt), rx_no_buffers.
    r.host.send(&frame(20, 4)).unwrap();
    r.host.send(&frame(100, 5)).unwrap();
    r.transport.device_mut().process_backend();
    // rx_merged: the waiting frame over two buffers.
    r.offer_rx(&[60]);
    r.offer_rx(&[60]);
    r.transport.device_mut().process_queue(RXQ);
    assert_eq!(r.count(|m| &m.rx_merged), 1);
    // interrupts_suppressed: the driver polls.
    r.set_avail_flags(RXQ, 1);
    r.offer_rx(&[1526]);
    r.host.send(&frame(100, 8)).unwrap();
    r.transport.device_mut().process_backend();
    r.set_avail_flags(RXQ, 0);
    // interrupt_errors: a saturated eventfd refuses the next write.
    let _ = r.irq.evt().read();
    r.irq.evt().write(u64::MAX - 1).unwrap();
    r.offer_rx(&[1526]);
    r.host.send(&frame(100, 6)).unwrap();
    r.transport.device_mut().process_backend();
    let json = r.transport.device().metrics_json();
    let obj = json.as_object().unwrap();
    assert_eq!(obj.len(), 14, "{json}");
    for (k, v) in obj {
        assert!(v.as_u64().unwrap() > 0, "counter {k} never moved: {json}");
    }
}
