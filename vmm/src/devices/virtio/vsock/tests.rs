//! The vsock device driven through the virtio-mmio transport the way a guest driver does,
//! with descriptor chains of every shape built in ordinary memory, and a real unix socket
//! host side.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::packet::{op, PacketHeader, HDR_SIZE, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
use super::{Vsock, VsockMetrics, RXQ, TXQ};
use crate::devices::virtio::mmio::test_driver::{bring_up, chain, read, write};
use crate::devices::virtio::{IrqLine, MmioTransport, VIRTIO_F_VERSION_1};

const GUEST_CID: u64 = 3;
const QSIZE: u16 = 256;

type Mock<'a> = MockSplitQueue<'a, GuestMemoryMmap>;

/// A guest driver's view: memory, queues, a bump allocator for buffers.
struct Guest<'a> {
    mem: &'a GuestMemoryMmap,
    queues: [Mock<'a>; 3],
    next_desc: [u16; 3],
    next_buf: u64,
    used_seen: [u16; 3],
}

/// One descriptor of a chain to build: (length, device-writable), or raw fields.
#[derive(Clone, Copy)]
enum D {
    Buf(u32, bool),
    Raw { addr: u64, len: u32, write: bool },
}

impl<'a> Guest<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        let q = |i: u64| MockSplitQueue::create(mem, GuestAddress(0x1_0000 * (i + 1)), QSIZE);
        Self {
            mem,
            queues: [q(0), q(1), q(2)],
            next_desc: [0; 3],
            next_buf: 0x10_0000,
            used_seen: [0; 3],
        }
    }

    fn alloc(&mut self, len: u32) -> u64 {
        let a = self.next_buf;
        self.next_buf += (u64::from(len) + 0xfff) & !0xfff;
        a
    }

    /// Adds a chain to queue `q` and returns the buffer address of each descriptor. With
    /// `link_to`, the last descriptor points to that index instead of ending the chain.
    fn add(&mut self, q: usize, descs: &[D], link_to: Option<u16>) -> Vec<u64> {
        let start = self.next_desc[q];
        let mut parts = Vec::new();
        let mut addrs = Vec::new();
        for d in descs {
            let (addr, len, w) = match *d {
                D::Buf(len, w) => (self.alloc(len.max(1)), len, w),
                D::Raw { addr, len, write } => (addr, len, write),
            };
            parts.push((addr, len, w));
            addrs.push(addr);
        }
        let raws = chain(start, &parts, link_to);
        self.queues[q].add_desc_chains(&raws, start).unwrap();
        self.next_desc[q] = start + descs.len() as u16;
        addrs
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

    /// Puts a packet (header + payload) on the TX queue split as `split` says: the sizes of
    /// consecutive descriptors, which must add up to the packet length.
    fn send(&mut self, hdr: PacketHeader, data: &[u8], split: &[u32]) {
        let mut bytes = hdr.to_bytes().to_vec();
        bytes.extend_from_slice(data);
        assert_eq!(split.iter().sum::<u32>() as usize, bytes.len());
        let descs: Vec<D> = split.iter().map(|l| D::Buf(*l, false)).collect();
        let addrs = self.add(TXQ, &descs, None);
        let mut off = 0;
        for (a, l) in addrs.iter().zip(split) {
            self.mem
                .write_slice(&bytes[off..off + *l as usize], GuestAddress(*a))
                .unwrap();
            off += *l as usize;
        }
    }

    /// Offers `n` receive buffers: header in one descriptor, 4 KiB payload in another.
    fn offer_rx(&mut self, n: usize) -> Vec<Vec<u64>> {
        (0..n)
            .map(|_| {
                self.add(
                    RXQ,
                    &[D::Buf(HDR_SIZE as u32, true), D::Buf(4096, true)],
                    None,
                )
            })
            .collect()
    }

    fn read_rx(&self, addrs: &[u64], len: u32) -> (PacketHeader, Vec<u8>) {
        let mut raw = [0u8; HDR_SIZE];
        self.mem
            .read_slice(&mut raw, GuestAddress(addrs[0]))
            .unwrap();
        let mut data = vec![0u8; len as usize - HDR_SIZE];
        self.mem
            .read_slice(&mut data, GuestAddress(addrs[1]))
            .unwrap();
        (PacketHeader::from_bytes(&raw), data)
    }
}

fn ghdr(op: u16, src_port: u32, dst_port: u32, len: u32) -> PacketHeader {
    PacketHeader {
        src_cid: GUEST_CID,
        dst_cid: 2,
        src_port,
        dst_port,
        len,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    uds: PathBuf,
    transport: MmioTransport,
    irq: Arc<IrqLine>,
    metrics: Arc<VsockMetrics>,
}

fn setup(mem: &GuestMemoryMmap, guest: &Guest<'_>) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let dev = Vsock::new(GUEST_CID as u32, &uds).unwrap();
    let metrics = dev.metrics();
    let irq = IrqLine::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let mut transport = MmioTransport::new(mem.clone(), Box::new(dev), irq.clone()).unwrap();
    assert_eq!(read(&mut transport, 0x08), 19);
    let qs: Vec<&Mock<'_>> = guest.queues.iter().collect();
    bring_up(&mut transport, 1 << VIRTIO_F_VERSION_1, &qs);
    assert!(transport.device().is_activated());
    // Config space: the guest CID.
    let mut cid = [0u8; 8];
    crate::devices::BusDevice::read(&mut transport, 0x100, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), GUEST_CID);
    Setup {
        _dir: dir,
        uds,
        transport,
        irq,
        metrics,
    }
}

impl Setup {
    /// The guest writes QueueNotify; the event loop sees the eventfd and runs the device.
    fn notify(&mut self, q: usize) {
        write(&mut self.transport, 0x50, q as u32);
        assert_eq!(self.transport.queue_evts()[q].read().unwrap(), 1);
        self.transport.device_mut().process_queue(q);
    }

    /// The event loop sees the backend's epoll fd readable.
    fn backend(&mut self) {
        self.transport.device_mut().process_backend();
    }

    fn count(&self, f: impl Fn(&VsockMetrics) -> &std::sync::atomic::AtomicU64) -> u64 {
        f(&self.metrics).load(Ordering::Relaxed)
    }
}

fn host_read(s: &mut UnixStream, n: usize) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).unwrap();
    buf
}

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
}

#[test]
fn host_initiated_connection_carries_data_both_ways() {
    let m = mem();
    let mut g = Guest::new(&m);
    let mut s = setup(&m, &g);
    let rx = g.offer_rx(8);

    let mut host = UnixStream::connect(&s.uds).unwrap();
    host.write_all(b"CONNECT 1024\n").unwrap();
    s.backend();
    let used = g.take_used(RXQ);
    assert_eq!(used.len(), 1);
    let (req, _) = g.read_rx(&rx[0], used[0].1);
    assert_eq!(
        (req.op, req.src_cid, req.dst_cid, req.dst_port),
        (op::REQUEST, 2, 3, 1024)
    );
    let local = req.src_port;
    assert_eq!(local, 1 << 30);
    assert_ne!(s.irq.status() & 1, 0, "used-buffer interrupt raised");
    assert_eq!(s.irq.evt().read().unwrap(), 1);

    // The guest accepts: header alone in one descriptor.
    g.send(ghdr(op::RESPONSE, 1024, local, 0), &[], &[44]);
    s.notify(TXQ);
    assert_eq!(host_read(&mut host, 14), format!("OK {local}\n").as_bytes());

    // Host -> guest.
    host.write_all(b"ping").unwrap();
    s.backend();
    let used = g.take_used(RXQ);
    assert_eq!(used.len(), 1);
    let (h, data) = g.read_rx(&rx[1], used[0].1);
    assert_eq!((h.op, h.len, &data[..]), (op::RW, 4, &b"ping"[..]));
    assert_eq!(h.buf_alloc, super::connection::CONN_BUF_SIZE);

    // Guest -> host: header and payload in one descriptor (Linux >= 6.1) ...
    g.send(ghdr(op::RW, 1024, local, 4), b"pong", &[48]);
    // ... split inside the header and inside the payload ...
    g.send(ghdr(op::RW, 1024, local, 6), b"split!", &[20, 24, 3, 3]);
    // ... and the classic layout, header then payload.
    g.send(ghdr(op::RW, 1024, local, 5), b"third", &[44, 5]);
    s.notify(TXQ);
    assert_eq!(host_read(&mut host, 15), b"pongsplit!third");
    assert_eq!(g.take_used(TXQ).len(), 4);

    // The guest closes: the host sees EOF and the guest gets an RST.
    let mut sd = ghdr(op::SHUTDOWN, 1024, local, 0);
    sd.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    g.send(sd, &[], &[44]);
    s.notify(TXQ);
    let mut b = [0u8; 1];
    assert_eq!(host.read(&mut b).unwrap(), 0);
    let used = g.take_used(RXQ);
    let (rst, _) = g.read_rx(&rx[2], used[0].1);
    assert_eq!(rst.op, op::RST);

    assert_eq!(s.count(|m| &m.tx_packets), 5);
    assert_eq!(s.count(|m| &m.tx_bytes), 15);
    assert_eq!(s.count(|m| &m.rx_packets), 3);
    assert_eq!(s.count(|m| &m.rx_bytes), 4);
    assert_eq!(s.count(|m| &m.conns_added), 1);
    assert_eq!(s.count(|m| &m.conns_removed), 1);
    assert_eq!(s.count(|m| &m.invalid_descriptors), 0);
}

#[test]
fn host_close_is_a_shutdown_to_the_guest() {
    let m = mem();
    let mut g = Guest::new(&m);
    let mut s = setup(&m, &g);
    let rx = g.offer_rx(4);
    let mut host = UnixStream::connect(&s.uds).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    s.backend();
    let n = g.take_used(RXQ)[0].1;
    let local = g.read_rx(&rx[0], n).0.src_port;
    g.send(ghdr(op::RESPONSE, 52, local, 0), &[], &[44]);
    s.notify(TXQ);
    assert_eq!(host_read(&mut host, 14), format!("OK {local}\n").as_bytes());
    drop(host);
    s.backend();
    let used = g.take_used(RXQ);
    let (h, _) = g.read_rx(&rx[1], used[0].1);
    assert_eq!(
        (h.op, h.flags),
        (op::SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND)
    );
    // The guest confirms with RST; the connection is gone.
    g.send(ghdr(op::RST, 52, local, 0), &[], &[44]);
    s.notify(TXQ);
    assert_eq!(s.count(|m| &m.conns_removed), 1);
}

#[test]
fn host_to_guest_respects_guest_credit() {
    let m = mem();
    let mut g = Guest::new(&m);
    let mut s = setup(&m, &g);
    let rx = g.offer_rx(8);
    let mut host = UnixStream::connect(&s.uds).unwrap();
    host.write_all(b"CONNECT 7\n").unwrap();
    s.backend();
    let n = g.take_used(RXQ)[0].1;
    let local = g.read_rx(&rx[0], n).0.src_port;
    let mut resp = ghdr(op::RESPONSE, 7, local, 0);
    resp.buf_alloc = 8;
    g.send(resp, &[], &[44]);
    s.notify(TXQ);
    host_read(&mut host, 14);

    host.write_all(b"0123456789abcdefghij").unwrap();
    s.backend();
    let used = g.take_used(RXQ);
    assert_eq!(used.len(), 1, "only one packet fits the 8-byte credit");
    let (_, data) = g.read_rx(&rx[1], used[0].1);
    assert_eq!(data, b"01234567");
    s.backend();
    assert!(g.take_used(RXQ).is_empty(), "no credit, nothing sent");

    let mut cu = ghdr(op::CREDIT_UPDATE, 7, local, 0);
    cu.buf_alloc = 8;
    cu.fwd_cnt = 8;
    g.send(cu, &[], &[44]);
    s.notify(TXQ);
    s.backend();
    let used = g.take_used(RXQ);
    assert_eq!(used.len(), 1);
    assert_eq!(g.read_rx(&rx[2], used[0].1).1, b"89abcdef");

    // A credit request is answered with our credit.
    g.send(ghdr(op::CREDIT_REQUEST, 7, local, 0), &[], &[44]);
    s.notify(TXQ);
    let used = g.take_used(RXQ);
    assert_eq!(g.read_rx(&rx[3], used[0].1).0.op, op::CREDIT_UPDATE);
}

#[test]
fn guest_initiated_connection_reaches_the_port_listener() {
    let m = mem();
    let mut g = Guest::new(&m);
    let mut s = setup(&m, &g);
    let rx = g.offer_rx(4);
    let listener = UnixListener::bind(format!("{}_5000", s.uds.display())).unwrap();

    g.send(ghdr(op::REQUEST, 40000, 5000, 0), &[], &[44]);
    s.notify(TXQ);
    let used = g.take_used(RXQ);
    let (h, _) = g.read_rx(&rx[0], used[0].1);
    assert_eq!((h.op, h.src_port, h.dst_port), (op::RESPONSE, 5000, 40000));
    let (mut peer, _) = listener.accept().unwrap();
    g.send(ghdr(op::RW, 40000, 5000, 2), b"hi", &[46]);
    s.notify(TXQ);
    assert_eq!(host_read(&mut peer, 2), b"hi");
    peer.write_all(b"yo").unwrap();
    s.backend();
    let used = g.take_used(RXQ);
    assert_eq!(g.read_rx(&rx[1], used[0].1).1, b"yo");

    // Nobody listens on 5001: refused with RST.
    g.send(ghdr(op::REQUEST, 40001, 5001, 0), &[], &[44]);
    s.notify(TXQ);
    let used = g.take_used(RXQ);
    let (h, _) = g.read_rx(&rx[2], used[0].1);
    assert_eq!((h.op, h.dst_port), (op::RST, 40001));
}

#[test]
fn malformed_chains_are_dropped_and_counted() {
    let m = mem();
    let mut g = Guest::new(&m);
    let mut s = setup(&m, &g);
    let rx = g.offer_rx(1);

    let loop_head = g.next_desc[TXQ];
    g.add(
        TXQ,
        &[D::Buf(44, false), D::Buf(44, false)],
        Some(loop_head),
    ); // loop
    g.add(TXQ, &[D::Buf(44, false)], Some(QSIZE + 10)); // next past the table
    g.add(
        TXQ,
        &[D::Raw {
            addr: (16 << 20) - 8,
            len: 44,
            write: false,
        }],
        None,
    ); // past RAM
    g.add(
        TXQ,
        &[D::Raw {
            addr: u64::MAX - 10,
            len: 44,
            write: false,
        }],
        None,
    ); // wraps
    g.add(TXQ, &[D::Buf(44, false), D::Buf(0, false)], None); // zero length
    g.add(TXQ, &[D::Buf(44, true)], None); // wrong direction
    g.send(ghdr(op::RW, 1, 2, 0), &[], &[20, 24]);
    // Header claims more payload than the chain has / than we ever accept.
    let mut short = [0u8; 44];
    short.copy_from_slice(&ghdr(op::RW, 1, 2, 100).to_bytes());
    let a = g.add(TXQ, &[D::Buf(50, false)], None);
    m.write_slice(&short, GuestAddress(a[0])).unwrap();
    let a = g.add(TXQ, &[D::Buf(30, false)], None); // shorter than a header
    let _ = a;
    let huge = ghdr(op::RW, 1, 2, u32::MAX).to_bytes();
    let a = g.add(TXQ, &[D::Buf(44, false)], None);
    m.write_slice(&huge, GuestAddress(a[0])).unwrap();
    s.notify(TXQ);
    // 9 malformed chains (the split empty RW above is well formed but for an unknown
    // connection: it is answered with RST, not counted as a bad descriptor).
    assert_eq!(s.count(|m| &m.invalid_descriptors), 9);
    assert_eq!(
        g.take_used(TXQ).len(),
        10,
        "every chain is returned to the guest"
    );
    let used = g.take_used(RXQ);
    assert_eq!(g.read_rx(&rx[0], used[0].1).0.op, op::RST);

    // Bad receive buffers: read-only, and too small for a header.
    g.add(RXQ, &[D::Buf(4096, false)], None);
    g.add(RXQ, &[D::Buf(20, true)], None);
    let good = g.offer_rx(1);
    g.send(ghdr(op::REQUEST, 9, 4242, 0), &[], &[44]); // nobody listens: RST
    s.notify(TXQ);
    assert_eq!(s.count(|m| &m.invalid_descriptors), 11);
    let used = g.take_used(RXQ);
    assert_eq!(used.iter().map(|u| u.1).collect::<Vec<_>>(), vec![0, 0, 44]);
    assert_eq!(g.read_rx(&good[0], 44).0.op, op::RST);

    // Packets with a foreign CID or type are refused without a crash.
    let mut foreign = ghdr(op::REQUEST, 9, 1024, 0);
    foreign.src_cid = 99;
    g.send(foreign, &[], &[44]);
    let mut dgram = ghdr(op::REQUEST, 9, 1024, 0);
    dgram.type_ = 2;
    g.send(dgram, &[], &[44]);
    s.notify(TXQ);
    // Those two, and the RW for an unknown connection above.
    assert_eq!(s.count(|m| &m.bad_packets), 3);
    // The device still works.
    assert!(s.transport.device().is_activated());
    assert_eq!(
        read(&mut s.transport, 0x70) & 64,
        0,
        "no DEVICE_NEEDS_RESET"
    );
}

#[test]
fn bad_connect_lines_are_closed() {
    let m = mem();
    let g = Guest::new(&m);
    let mut s = setup(&m, &g);
    for line in [&b"HELLO\n"[..], b"CONNECT x\n", &[b'A'; 100]] {
        let mut host = UnixStream::connect(&s.uds).unwrap();
        host.write_all(line).unwrap();
        s.backend();
        let mut b = [0u8; 1];
        host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let closed = match host.read(&mut b) {
            Ok(n) => n == 0,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        };
        assert!(closed, "closed after {line:?}");
    }
    assert_eq!(s.count(|m| &m.conn_errors), 3);
}
