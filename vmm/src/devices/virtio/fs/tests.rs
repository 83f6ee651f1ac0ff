//! The virtio-fs frontend driven through the virtio-mmio transport the way Linux's driver
//! does, against (1) a scripted in-process vhost-user backend that records every message
//! and the file descriptors attached to it, and (2) the real virtiofsd answering FUSE_INIT
//! through rings in our memfd.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::{Fs, FsError, FsMetrics, VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_ID_FS};
use crate::config::FsConfig;
use crate::devices::virtio::mmio::test_driver::{bring_up, read, write};
use crate::devices::virtio::{
    status, InterruptKind, IrqLine, MmioTransport, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1,
};
use crate::vstate::memory::{create_guest_memory, Backing};

// vhost-user request codes.
const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_BASE: u32 = 10;
const GET_VRING_BASE: u32 = 11;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const GET_QUEUE_NUM: u32 = 17;
const SET_VRING_ENABLE: u32 = 18;
const RESET_DEVICE: u32 = 34;
// Protocol feature bits.
const PF_MQ: u64 = 1 << 0;
const PF_REPLY_ACK: u64 = 1 << 3;
const PF_CONFIG: u64 = 1 << 9;
const PF_RESET_DEVICE: u64 = 1 << 13;
const NEED_REPLY: u32 = 0x8;
const EVENT_IDX: u64 = 1 << 29;

/// What the scripted backend does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Answers like a real backend.
    Normal,
    /// Reads the first message and closes the connection.
    CloseAfterFirst,
    /// Answers GET_FEATURES with bytes that are no vhost-user reply.
    Garbage,
    /// Reads everything, answers nothing.
    Silent,
}

/// One message the backend received.
#[derive(Debug)]
struct Msg {
    code: u32,
    flags: u32,
    body: Vec<u8>,
    fds: Vec<File>,
}

impl Msg {
    fn u32_at(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.body[off..off + 4].try_into().unwrap())
    }
    fn u64_at(&self, off: usize) -> u64 {
        u64::from_le_bytes(self.body[off..off + 8].try_into().unwrap())
    }
}

/// A vhost-user backend in a thread: records every message; refuses (acknowledges with a
/// non-zero status) the request whose code is in `refuse`.
struct FakeBackend {
    socket: PathBuf,
    msgs: Arc<Mutex<Vec<Msg>>>,
    refuse: Arc<AtomicU32>,
    conn: Arc<Mutex<Option<UnixStream>>>,
    thread: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl FakeBackend {
    fn start(mode: Mode, protocol: u64, queue_num: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("backend.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let msgs = Arc::new(Mutex::new(Vec::new()));
        let refuse = Arc::new(AtomicU32::new(0));
        let conn = Arc::new(Mutex::new(None));
        let (m, r, c) = (msgs.clone(), refuse.clone(), conn.clone());
        let thread = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            *c.lock().unwrap() = Some(stream.try_clone().unwrap());
            serve(stream, mode, protocol, queue_num, &m, &r);
            // The backend is gone: no handle of its side may survive.
            c.lock().unwrap().take();
        });
        Self {
            socket,
            msgs,
            refuse,
            conn,
            thread: Some(thread),
            _dir: dir,
        }
    }

    fn codes(&self) -> Vec<u32> {
        self.msgs.lock().unwrap().iter().map(|m| m.code).collect()
    }

    /// Waits until the frontend's side of the connection is closed.
    fn join(&mut self) {
        self.thread.take().unwrap().join().unwrap();
    }

    /// Closes the backend's side (a crashing backend).
    fn hang_up(&self) {
        let c = self.conn.lock().unwrap();
        c.as_ref()
            .unwrap()
            .shutdown(std::net::Shutdown::Both)
            .unwrap();
    }
}

fn reply(s: &mut UnixStream, code: u32, body: &[u8]) {
    let mut msg = Vec::new();
    msg.extend_from_slice(&code.to_le_bytes());
    msg.extend_from_slice(&(0x1u32 | 0x4).to_le_bytes());
    msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
    msg.extend_from_slice(body);
    let _ = s.write_all(&msg);
}

fn serve(
    mut s: UnixStream,
    mode: Mode,
    protocol: u64,
    queue_num: u64,
    msgs: &Mutex<Vec<Msg>>,
    refuse: &AtomicU32,
) {
    loop {
        let mut hdr = [0u8; 12];
        let mut fds = [-1 as RawFd; 8];
        let mut iov = [libc::iovec {
            iov_base: hdr.as_mut_ptr().cast(),
            iov_len: hdr.len(),
        }];
        // SAFETY: the iovec points at `hdr`, which lives across the call and is plain bytes.
        let (n, nfds) = match unsafe { s.recv_with_fds(&mut iov, &mut fds) } {
            Ok(r) => r,
            Err(_) => return,
        };
        if n == 0 {
            return; // The frontend closed the connection.
        }
        assert_eq!(n, 12, "a whole header per read");
        let fds: Vec<File> = fds[..nfds]
            .iter()
            // SAFETY: the kernel just installed these descriptors for us; nobody else owns them.
            .map(|&fd| unsafe { File::from_raw_fd(fd) })
            .collect();
        let code = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
        let flags = u32::from_le_bytes(hdr[4..8].try_into().unwrap());
        let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap());
        let mut body = vec![0u8; size as usize];
        if s.read_exact(&mut body).is_err() {
            return;
        }
        let index = body.get(..4).map(|b| b.to_vec());
        msgs.lock().unwrap().push(Msg {
            code,
            flags,
            body,
            fds,
        });
        match mode {
            Mode::CloseAfterFirst => return,
            Mode::Silent => continue,
            Mode::Garbage if code == GET_FEATURES => {
                let _ = s.write_all(&[0xff; 20]);
                continue;
            }
            _ => {}
        }
        let features =
            (1u64 << VIRTIO_F_VERSION_1) | EVENT_IDX | (1 << VHOST_USER_F_PROTOCOL_FEATURES);
        match code {
            GET_FEATURES => reply(&mut s, code, &features.to_le_bytes()),
            GET_PROTOCOL_FEATURES => reply(&mut s, code, &protocol.to_le_bytes()),
            GET_QUEUE_NUM => reply(&mut s, code, &queue_num.to_le_bytes()),
            GET_VRING_BASE => {
                let mut b = index.unwrap();
                b.extend_from_slice(&0u32.to_le_bytes());
                reply(&mut s, code, &b);
            }
            _ if flags & NEED_REPLY != 0 => {
                let status = u64::from(refuse.load(Ordering::SeqCst) == code);
                reply(&mut s, code, &status.to_le_bytes());
            }
            _ => {}
        }
    }
}

fn fs_config(socket: &Path, request_queues: u16) -> FsConfig {
    FsConfig {
        tag: "shared".into(),
        socket: socket.to_path_buf(),
        num_request_queues: request_queues,
        queue_size: 256,
    }
}

fn transport(mem: &GuestMemoryMmap, dev: Fs) -> MmioTransport {
    let irq = IrqLine::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    MmioTransport::new(mem.clone(), Box::new(dev), irq).unwrap()
}

/// Waits until `fd` is readable (the device's backend fd, as the event loop would).
fn wait_readable(fd: RawFd, within: Duration) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut p, 1, within.as_millis() as i32) };
    n == 1
}

fn write_u64(f: &File, v: u64) {
    (&*f).write_all(&v.to_le_bytes()).unwrap();
}

fn read_u64(f: &File) -> u64 {
    let mut b = [0u8; 8];
    (&*f).read_exact(&mut b).unwrap();
    u64::from_le_bytes(b)
}

fn features() -> u64 {
    (1 << VIRTIO_F_VERSION_1) | EVENT_IDX
}

#[test]
fn handshake_activation_and_reset_send_what_the_spec_asks() {
    let mut backend = FakeBackend::start(
        Mode::Normal,
        PF_REPLY_ACK | PF_MQ | PF_RESET_DEVICE | PF_CONFIG,
        2,
    );
    // 4 GiB: two RAM regions around the MMIO gap, both windows of one memfd. Only the
    // pages the queues use are touched.
    let mem = create_guest_memory(4 << 30, Backing::Shared).unwrap();
    assert_eq!(mem.num_regions(), 2);
    let dev = Fs::new(&fs_config(&backend.socket, 1), None).unwrap();
    let metrics = dev.metrics();
    assert_eq!(
        backend.codes(),
        [
            SET_OWNER,
            GET_FEATURES,
            GET_PROTOCOL_FEATURES,
            SET_PROTOCOL_FEATURES,
            GET_QUEUE_NUM
        ]
    );
    // Only the protocol features we use are acknowledged.
    assert_eq!(
        backend.msgs.lock().unwrap()[3].u64_at(0),
        PF_REPLY_ACK | PF_MQ | PF_RESET_DEVICE
    );
    // The guest sees the ring features, never the vhost-user bit.
    assert_eq!(dev.avail_features(), features());
    let mut t = transport(&mem, dev);
    assert!(
        t.notifications_external(),
        "the event loop must leave the kicks alone"
    );
    assert_eq!(read(&mut t, 0x08), VIRTIO_ID_FS);
    let mut cfg = [0u8; 40];
    crate::devices::BusDevice::read(&mut t, 0x100, &mut cfg);
    assert_eq!(&cfg[..6], b"shared");
    assert!(cfg[6..36].iter().all(|&b| b == 0));
    assert_eq!(u32::from_le_bytes(cfg[36..].try_into().unwrap()), 1);
    for (q, max) in [(0, 256), (1, 256), (2, 0)] {
        write(&mut t, 0x30, q);
        assert_eq!(read(&mut t, 0x34), max);
    }

    let hiprio = MockSplitQueue::create(&mem, GuestAddress(0x10_0000), 256);
    let request = MockSplitQueue::create(&mem, GuestAddress(0x20_0000), 256);
    bring_up(&mut t, features(), &[&hiprio, &request]);
    assert!(t.device().is_activated());
    assert_eq!(read(&mut t, 0x70) & status::DEVICE_NEEDS_RESET, 0);

    let msgs = backend.msgs.lock().unwrap();
    let setup: Vec<u32> = msgs[5..].iter().map(|m| m.code).collect();
    let per_queue = [
        SET_VRING_NUM,
        SET_VRING_ADDR,
        SET_VRING_BASE,
        SET_VRING_CALL,
        SET_VRING_KICK,
        SET_VRING_ENABLE,
    ];
    let mut expected = vec![SET_FEATURES, SET_MEM_TABLE];
    expected.extend(per_queue);
    expected.extend(per_queue);
    assert_eq!(setup, expected);
    assert!(msgs[5..].iter().all(|m| m.flags & NEED_REPLY != 0));
    // What the guest acked, plus the protocol-features bit.
    assert_eq!(
        msgs[5].u64_at(0),
        features() | (1 << VHOST_USER_F_PROTOCOL_FEATURES)
    );
    // The memory table: both regions, each with the memfd and its offset in it.
    let table = &msgs[6];
    assert_eq!(table.u32_at(0), 2);
    let mut want = Vec::new();
    for r in mem.iter() {
        use vm_memory::GuestMemoryRegion;
        want.push((
            r.start_addr().0,
            r.len(),
            r.get_host_address(vm_memory::MemoryRegionAddress(0))
                .unwrap() as u64,
            r.file_offset().unwrap().start(),
        ));
    }
    for (i, w) in want.iter().enumerate() {
        let o = 8 + i * 32;
        let got = (
            table.u64_at(o),
            table.u64_at(o + 8),
            table.u64_at(o + 16),
            table.u64_at(o + 24),
        );
        assert_eq!(got, *w, "region {i}");
    }
    assert_eq!(want[1].0, 1 << 32);
    assert_eq!(want[1].3, 0xd000_0000);
    assert_eq!(table.fds.len(), 2, "one memfd per region");
    for fd in &table.fds {
        assert_eq!(fd.metadata().unwrap().len(), 4 << 30, "the guest RAM memfd");
    }
    // Rings: sizes, our virtual addresses of the guest's rings, base 0.
    for (q, mock) in [(0usize, &hiprio), (1, &request)] {
        let m = |code| msgs[7..].iter().filter(|m| m.code == code).nth(q).unwrap();
        assert_eq!(
            (m(SET_VRING_NUM).u32_at(0), m(SET_VRING_NUM).u32_at(4)),
            (q as u32, 256)
        );
        let hva = |a| mem.get_host_address(a).unwrap() as u64;
        let addr = m(SET_VRING_ADDR);
        assert_eq!(addr.u32_at(0), q as u32);
        assert_eq!(addr.u64_at(8), hva(mock.desc_table_addr()));
        assert_eq!(addr.u64_at(16), hva(mock.used_addr()));
        assert_eq!(addr.u64_at(24), hva(mock.avail_addr()));
        assert_eq!(m(SET_VRING_BASE).u32_at(4), 0);
        assert_eq!(m(SET_VRING_ENABLE).u32_at(4), 1);
        assert_eq!(m(SET_VRING_KICK).fds.len(), 1);
        assert_eq!(m(SET_VRING_CALL).fds.len(), 1);
    }
    // The kick fd is the queue's notification eventfd (the KVM ioeventfd in a VM).
    let kick = |q: usize| {
        msgs[7..]
            .iter()
            .filter(|m| m.code == SET_VRING_KICK)
            .nth(q)
            .unwrap()
    };
    let call = |q: usize| {
        msgs[7..]
            .iter()
            .filter(|m| m.code == SET_VRING_CALL)
            .nth(q)
            .unwrap()
    };
    write(&mut t, 0x50, 1);
    assert_eq!(read_u64(&kick(1).fds[0]), 1);
    // A call from the backend becomes an interrupt with the VRING status bit set.
    assert_eq!(read(&mut t, 0x60), 0);
    write_u64(&call(1).fds[0], 1);
    let efd = t.device().backend_fd().unwrap();
    assert!(wait_readable(efd, Duration::from_secs(5)));
    t.device_mut().process_backend();
    assert_eq!(read(&mut t, 0x60), InterruptKind::UsedBuffer as u32);
    assert_eq!(metrics.interrupts.load(Ordering::Relaxed), 1);
    let n = msgs.len();
    drop(msgs);

    // Guest reset: the rings are stopped and fetched back, the backend session reset.
    write(&mut t, 0x70, 0);
    assert!(!t.device().is_activated());
    assert_eq!(
        backend.codes()[n..],
        [
            SET_VRING_ENABLE,
            GET_VRING_BASE,
            SET_VRING_ENABLE,
            GET_VRING_BASE,
            RESET_DEVICE
        ]
    );
    assert_eq!(read(&mut t, 0x70), 0);
    // And the device comes back for the next driver.
    bring_up(&mut t, features(), &[&hiprio, &request]);
    assert!(t.device().is_activated());
    assert_eq!(metrics.activations.load(Ordering::Relaxed), 2);
    assert_eq!(metrics.backend_errors.load(Ordering::Relaxed), 0);
    // Dropping the device closes the connection.
    drop(t);
    backend.join();
}

#[test]
fn backend_closing_mid_handshake_is_a_clean_error() {
    let mut backend = FakeBackend::start(Mode::CloseAfterFirst, 0, 0);
    let started = Instant::now();
    let err = Fs::new(&fs_config(&backend.socket, 1), None).unwrap_err();
    assert!(matches!(err, FsError::Protocol { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
    backend.join();
}

#[test]
fn garbage_from_the_backend_is_a_clean_error() {
    let mut backend = FakeBackend::start(Mode::Garbage, 0, 0);
    let err = Fs::new(&fs_config(&backend.socket, 1), None).unwrap_err();
    assert!(
        matches!(
            err,
            FsError::Protocol {
                step: "GET_FEATURES",
                ..
            }
        ),
        "{err}"
    );
    backend.join();
}

#[test]
fn silent_backend_is_cut_off_by_the_watchdog() {
    silent_backend_cut_off(None);
}

/// The same with the watchdog's seccomp filter installed on its thread: cutting the
/// connection, logging it and the thread's exit need nothing the filter forbids (a
/// forbidden syscall would end this whole test process with status 148).
#[test]
fn filtered_watchdog_cuts_off_a_silent_backend() {
    let filter = crate::seccomp::filter(crate::seccomp::ThreadKind::Watchdog).unwrap();
    silent_backend_cut_off(Some(std::sync::Arc::new(filter)));
}

fn silent_backend_cut_off(filter: Option<std::sync::Arc<seccompiler::BpfProgram>>) {
    let mut backend = FakeBackend::start(Mode::Silent, 0, 0);
    let started = Instant::now();
    let err = Fs::with_timeout(
        &fs_config(&backend.socket, 1),
        Duration::from_millis(300),
        filter,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            FsError::Protocol {
                step: "GET_FEATURES",
                ..
            }
        ),
        "{err}"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // The backend saw the connection end.
    backend.join();
}

#[test]
fn backend_with_too_few_queues_or_no_socket_is_refused() {
    let backend = FakeBackend::start(Mode::Normal, PF_MQ, 2);
    let err = Fs::new(&fs_config(&backend.socket, 2), None).unwrap_err();
    assert!(matches!(err, FsError::Unsupported(_)), "{err}");
    let missing = Path::new("/nonexistent/virtiofsd.sock");
    let err = Fs::new(&fs_config(missing, 1), None).unwrap_err();
    assert!(matches!(err, FsError::Connect { .. }), "{err}");
}

#[test]
fn refused_setup_breaks_the_device_until_reset() {
    let mut backend = FakeBackend::start(Mode::Normal, PF_REPLY_ACK, 0);
    backend.refuse.store(SET_MEM_TABLE, Ordering::SeqCst);
    let mem = create_guest_memory(64 << 20, Backing::Shared).unwrap();
    let dev = Fs::new(&fs_config(&backend.socket, 1), None).unwrap();
    let metrics = dev.metrics();
    let mut t = transport(&mem, dev);
    let q0 = MockSplitQueue::create(&mem, GuestAddress(0x10_0000), 256);
    let q1 = MockSplitQueue::create(&mem, GuestAddress(0x20_0000), 256);
    bring_up(&mut t, 1 << VIRTIO_F_VERSION_1, &[&q0, &q1]);
    assert!(!t.device().is_activated());
    assert_ne!(read(&mut t, 0x70) & status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(read(&mut t, 0x60), InterruptKind::ConfigChange as u32);
    assert_eq!(metrics.backend_errors.load(Ordering::Relaxed), 1);
    assert_eq!(metrics.activation_errors.load(Ordering::Relaxed), 1);
    // We cut the connection: the backend sees the end and stops.
    backend.join();
    assert_eq!(*backend.codes().last().unwrap(), SET_MEM_TABLE);
    // A reset does not hang on the dead backend; the device keeps saying it is broken.
    write(&mut t, 0x70, 0);
    assert_ne!(read(&mut t, 0x70) & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn backend_hang_up_while_active_asks_for_a_reset() {
    let mut backend = FakeBackend::start(Mode::Normal, PF_REPLY_ACK, 0);
    let mem = create_guest_memory(64 << 20, Backing::Shared).unwrap();
    let dev = Fs::new(&fs_config(&backend.socket, 1), None).unwrap();
    let metrics = dev.metrics();
    let mut t = transport(&mem, dev);
    let q0 = MockSplitQueue::create(&mem, GuestAddress(0x10_0000), 256);
    let q1 = MockSplitQueue::create(&mem, GuestAddress(0x20_0000), 256);
    bring_up(&mut t, 1 << VIRTIO_F_VERSION_1, &[&q0, &q1]);
    assert!(t.device().is_activated());
    backend.hang_up();
    backend.join();
    let efd = t.device().backend_fd().unwrap();
    assert!(wait_readable(efd, Duration::from_secs(5)));
    t.device_mut().process_backend();
    assert_eq!(metrics.backend_disconnects.load(Ordering::Relaxed), 1);
    assert_ne!(read(&mut t, 0x70) & status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(read(&mut t, 0x60), InterruptKind::ConfigChange as u32);
    // The hang-up is reported once, not on every loop iteration.
    assert!(!wait_readable(efd, Duration::from_millis(50)));
    let started = Instant::now();
    write(&mut t, 0x70, 0);
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(!t.device().is_activated());
}

/// An interrupt that fails on demand.
#[derive(Default)]
struct FlakyInterrupt {
    fail: AtomicBool,
}

impl VirtioInterrupt for FlakyInterrupt {
    fn trigger(&self, _kind: InterruptKind) -> std::io::Result<()> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("irqfd gone"));
        }
        Ok(())
    }
}

#[test]
fn every_counter_moves() {
    let backend = FakeBackend::start(Mode::Normal, PF_REPLY_ACK, 0);
    let mem = create_guest_memory(64 << 20, Backing::Shared).unwrap();
    let mut dev = Fs::new(&fs_config(&backend.socket, 1), None).unwrap();
    let metrics: Arc<FsMetrics> = dev.metrics();
    let kicks = [
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    ];
    assert!(dev.take_queue_evts(&kicks));
    let queues = || -> Vec<Queue> {
        [0x10_0000, 0x20_0000]
            .iter()
            .map(|&a| {
                MockSplitQueue::create(&mem, GuestAddress(a), 256)
                    .create_queue()
                    .unwrap()
            })
            .collect()
    };
    let irq = Arc::new(FlakyInterrupt::default());
    dev.set_acked_features(1 << VIRTIO_F_VERSION_1);
    // Wrong queue count: activation_errors.
    assert!(dev
        .activate(
            mem.clone(),
            queues().into_iter().take(1).collect(),
            irq.clone()
        )
        .is_err());
    // activations.
    dev.activate(mem.clone(), queues(), irq.clone()).unwrap();
    let call = backend
        .msgs
        .lock()
        .unwrap()
        .iter()
        .find(|m| m.code == SET_VRING_CALL)
        .map(|m| m.fds[0].try_clone().unwrap())
        .unwrap();
    // call_events + interrupts, then interrupt_errors.
    write_u64(&call, 1);
    dev.process_backend();
    irq.fail.store(true, Ordering::SeqCst);
    write_u64(&call, 1);
    dev.process_backend();
    // resets.
    assert!(dev.reset());
    // backend_errors: the backend refuses the memory table; we cut the connection, which
    // the event loop then sees as a hang-up (backend_disconnects).
    backend.refuse.store(SET_MEM_TABLE, Ordering::SeqCst);
    dev.set_acked_features(1 << VIRTIO_F_VERSION_1);
    assert!(dev.activate(mem.clone(), queues(), irq.clone()).is_err());
    dev.process_backend();

    let json = dev.metrics_json();
    let counters = json.as_object().unwrap();
    assert_eq!(counters.len(), 8);
    for (name, value) in counters {
        assert!(value.as_u64().unwrap() > 0, "counter {name} never moved");
    }
    assert_eq!(metrics.interrupts.load(Ordering::Relaxed), 1);
    assert_eq!(metrics.interrupt_errors.load(Ordering::Relaxed), 1);
}

// --- the real virtiofsd --------------------------------------------------------------

fn virtiofsd() -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("virtiofsd"))
                .find(|p| p.is_file())
        })
        .expect("virtiofsd is not on PATH: scripts/setup.sh installs it")
}

struct Virtiofsd {
    child: std::process::Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Virtiofsd {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::write(shared.join("hello.txt"), b"hello from the host\n").unwrap();
        let socket = dir.path().join("virtiofsd.sock");
        let child = std::process::Command::new(virtiofsd())
            .arg("--socket-path")
            .arg(&socket)
            .arg("--shared-dir")
            .arg(&shared)
            .args(["--sandbox", "none", "--log-level", "error"])
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "virtiofsd did not create its socket"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            socket,
            _dir: dir,
        }
    }

    /// Waits for virtiofsd to exit by itself.
    fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const FUSE_INIT: u32 = 26;
const IN_HDR: u64 = 0x30_0000;
const OUT_HDR: u64 = 0x31_0000;

/// Sends FUSE_INIT on the request queue, kicks it, waits for the backend's call and
/// returns the reply's (error, unique, major).
fn fuse_init(
    t: &mut MmioTransport,
    mem: &GuestMemoryMmap,
    request: &MockSplitQueue<'_, GuestMemoryMmap>,
    unique: u64,
    chain_start: u16,
) -> (i32, u64, u32) {
    let mut req = Vec::new();
    req.extend_from_slice(&56u32.to_le_bytes()); // len
    req.extend_from_slice(&FUSE_INIT.to_le_bytes());
    req.extend_from_slice(&unique.to_le_bytes());
    req.extend_from_slice(&[0u8; 8 + 4 * 3 + 4]); // nodeid, uid, gid, pid, extlen+pad
    req.extend_from_slice(&7u32.to_le_bytes()); // major
    req.extend_from_slice(&31u32.to_le_bytes()); // minor
    req.extend_from_slice(&[0u8; 8]); // max_readahead, flags
    mem.write_slice(&req, GuestAddress(IN_HDR)).unwrap();
    mem.write_slice(&[0u8; 256], GuestAddress(OUT_HDR)).unwrap();
    let descs = [
        RawDescriptor::from(SplitDescriptor::new(
            IN_HDR,
            req.len() as u32,
            VRING_DESC_F_NEXT as u16,
            chain_start + 1,
        )),
        RawDescriptor::from(SplitDescriptor::new(
            OUT_HDR,
            256,
            VRING_DESC_F_WRITE as u16,
            0,
        )),
    ];
    let used_before = request.used().idx().load();
    request.add_desc_chains(&descs, chain_start).unwrap();
    write(t, 0x50, 1); // QueueNotify: goes straight to virtiofsd through the kick eventfd.
    let efd = t.device().backend_fd().unwrap();
    assert!(
        wait_readable(efd, Duration::from_secs(10)),
        "virtiofsd did not signal the call eventfd"
    );
    t.device_mut().process_backend();
    assert_eq!(read(t, 0x60) & 1, 1, "VRING interrupt status bit");
    write(t, 0x64, 1);
    assert_eq!(request.used().idx().load(), used_before.wrapping_add(1));
    let error: i32 = mem.read_obj(GuestAddress(OUT_HDR + 4)).unwrap();
    let got_unique: u64 = mem.read_obj(GuestAddress(OUT_HDR + 8)).unwrap();
    let major: u32 = mem.read_obj(GuestAddress(OUT_HDR + 16)).unwrap();
    (error, got_unique, major)
}

#[test]
fn virtiofsd_answers_fuse_init_through_our_rings_and_exits_when_we_go() {
    let mut daemon = Virtiofsd::start();
    let mem = create_guest_memory(64 << 20, Backing::Shared).unwrap();
    let dev = Fs::new(&fs_config(&daemon.socket, 1), None).unwrap();
    let metrics = dev.metrics();
    let features = dev.avail_features();
    assert_ne!(features & (1 << VIRTIO_F_VERSION_1), 0);
    let mut t = transport(&mem, dev);
    let hiprio = MockSplitQueue::create(&mem, GuestAddress(0x10_0000), 256);
    let request = MockSplitQueue::create(&mem, GuestAddress(0x20_0000), 256);
    bring_up(&mut t, features, &[&hiprio, &request]);
    assert!(t.device().is_activated(), "virtiofsd took the rings");
    assert_eq!(fuse_init(&mut t, &mem, &request, 7, 0), (0, 7, 7));

    // A guest reset stops the rings and resets virtiofsd's session; a new driver starts
    // over with fresh rings and gets a fresh FUSE_INIT answered.
    write(&mut t, 0x70, 0);
    assert!(!t.device().is_activated());
    let hiprio = MockSplitQueue::create(&mem, GuestAddress(0x10_0000), 256);
    let request = MockSplitQueue::create(&mem, GuestAddress(0x20_0000), 256);
    bring_up(&mut t, features, &[&hiprio, &request]);
    assert!(t.device().is_activated());
    assert_eq!(fuse_init(&mut t, &mem, &request, 8, 0), (0, 8, 7));
    assert_eq!(metrics.activations.load(Ordering::Relaxed), 2);
    assert_eq!(metrics.resets.load(Ordering::Relaxed), 1);
    assert_eq!(metrics.backend_errors.load(Ordering::Relaxed), 0);
    assert!(metrics.interrupts.load(Ordering::Relaxed) >= 2);

    // When the VMM goes away, virtiofsd sees the connection end and exits.
    drop(t);
    assert!(
        daemon.wait_exit(Duration::from_secs(10)).is_some(),
        "virtiofsd still running after the frontend closed"
    );
}
