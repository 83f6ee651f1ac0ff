//! The vhost-user side of the device: one connection to the backend, driven with the
//! `vhost` crate's [`Frontend`], every exchange bounded by a [`Watchdog`].
//!
//! The `vhost` crate retries `EAGAIN` forever, so a socket receive timeout would turn a
//! silent backend into a busy loop rather than an error. Instead a watchdog thread cuts
//! the connection (`shutdown(2)`) when an exchange outlives its deadline: the blocked
//! `recvmsg` then returns end-of-file and the request fails with an error.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use seccompiler::BpfProgram;
use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};
use vmm_sys_util::eventfd::EventFd;

use super::{FsError, VHOST_USER_F_PROTOCOL_FEATURES};
use crate::seccomp::{self, ThreadKind};

/// Protocol features we use when the backend offers them: acknowledged requests (so every
/// setup step is confirmed), the queue-count query, and a device reset on guest reset.
fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::RESET_DEVICE
}

fn step(step: &'static str) -> impl FnOnce(vhost::Error) -> FsError {
    move |source| FsError::Protocol { step, source }
}

#[derive(Debug, Default)]
struct WatchState {
    deadline: Option<Instant>,
    fired: bool,
    quit: bool,
}

/// Cuts the connection when an armed exchange outlives its deadline.
#[derive(Debug)]
pub(super) struct Watchdog {
    shared: Arc<(Mutex<WatchState>, Condvar)>,
    timeout: Duration,
    thread: Option<JoinHandle<()>>,
}

/// An armed [`Watchdog`]; disarms when dropped.
pub(super) struct Armed<'a>(&'a Watchdog);

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        self.0.state().deadline = None;
    }
}

impl Watchdog {
    /// Starts the watchdog thread, which installs `filter` (the watchdog's seccomp filter)
    /// on itself before anything else; `None`: unfiltered (seccomp off).
    fn new(
        sock: UnixStream,
        timeout: Duration,
        filter: Option<Arc<BpfProgram>>,
    ) -> Result<Self, FsError> {
        let shared = Arc::new((Mutex::new(WatchState::default()), Condvar::new()));
        let theirs = shared.clone();
        let (installed_tx, installed_rx) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("vhost-user-watchdog".into())
            .spawn(move || {
                let installed = match &filter {
                    Some(f) => seccomp::apply(ThreadKind::Watchdog, f).map_err(|e| e.to_string()),
                    None => Ok(()),
                };
                let ok = installed.is_ok();
                let _ = installed_tx.send(installed);
                if ok {
                    Self::watch(&theirs, &sock);
                }
            })
            .map_err(|source| FsError::Setup {
                what: "the vhost-user watchdog thread",
                source,
            })?;
        let installed = installed_rx
            .recv()
            .unwrap_or_else(|_| Err("the thread ended before reporting".into()));
        if let Err(e) = installed {
            let _ = thread.join();
            return Err(FsError::Setup {
                what: "the vhost-user watchdog's seccomp filter",
                source: std::io::Error::other(e),
            });
        }
        Ok(Self {
            shared,
            timeout,
            thread: Some(thread),
        })
    }

    fn watch(shared: &(Mutex<WatchState>, Condvar), sock: &UnixStream) {
        let (lock, cvar) = shared;
        let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if st.quit {
                return;
            }
            st = match st.deadline {
                None => cvar.wait(st).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        tracing::warn!("vhost-user backend did not answer in time; disconnecting");
                        let _ = sock.shutdown(std::net::Shutdown::Both);
                        st.fired = true;
                        st.deadline = None;
                        continue;
                    }
                    cvar.wait_timeout(st, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    fn state(&self) -> MutexGuard<'_, WatchState> {
        self.shared.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the clock for one exchange.
    fn arm(&self) -> Armed<'_> {
        self.state().deadline = Some(Instant::now() + self.timeout);
        self.shared.1.notify_all();
        Armed(self)
    }

    /// Whether the watchdog ever cut the connection.
    pub(super) fn fired(&self) -> bool {
        self.state().fired
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.state().quit = true;
        self.shared.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One queue as the driver set it up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct VringSetup {
    pub size: u16,
    pub max_size: u16,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
}

impl VringSetup {
    pub fn of(q: &Queue) -> Self {
        Self {
            size: q.size(),
            max_size: q.max_size(),
            desc_table: q.desc_table(),
            avail_ring: q.avail_ring(),
            used_ring: q.used_ring(),
            next_avail: q.next_avail(),
        }
    }
}

/// The connection to a vhost-user backend.
pub(super) struct Connection {
    frontend: Frontend,
    /// A second handle on the socket: the event loop watches it for hang-ups, and it is
    /// how we cut the connection.
    sock: UnixStream,
    watchdog: Watchdog,
    /// What the backend offers in the virtio feature word.
    pub backend_features: u64,
    /// The protocol features in use.
    pub protocol: VhostUserProtocolFeatures,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("backend_features", &self.backend_features)
            .field("protocol", &self.protocol)
            .finish()
    }
}

impl Connection {
    /// Connects to `path` and does the session handshake: SET_OWNER, GET_FEATURES, and with
    /// protocol features GET/SET_PROTOCOL_FEATURES and GET_QUEUE_NUM (the backend must
    /// serve `num_queues` queues).
    ///
    /// `filter` is the watchdog thread's seccomp filter (`None`: seccomp off).
    pub fn connect(
        path: &Path,
        num_queues: usize,
        timeout: Duration,
        filter: Option<Arc<BpfProgram>>,
    ) -> Result<Self, FsError> {
        let connect_err = |source| FsError::Connect {
            path: path.display().to_string(),
            source,
        };
        let stream = UnixStream::connect(path).map_err(connect_err)?;
        let sock = stream.try_clone().map_err(connect_err)?;
        let watchdog = Watchdog::new(sock.try_clone().map_err(connect_err)?, timeout, filter)?;
        let mut conn = Self {
            frontend: Frontend::from_stream(stream, num_queues as u64),
            sock,
            watchdog,
            backend_features: 0,
            protocol: VhostUserProtocolFeatures::empty(),
        };
        if let Err(e) = conn.handshake(num_queues) {
            conn.disconnect();
            return Err(e);
        }
        Ok(conn)
    }

    fn handshake(&mut self, num_queues: usize) -> Result<(), FsError> {
        let _armed = self.watchdog.arm();
        let fe = &mut self.frontend;
        fe.set_owner().map_err(step("SET_OWNER"))?;
        self.backend_features = fe.get_features().map_err(step("GET_FEATURES"))?;
        if self.backend_features & (1 << VHOST_USER_F_PROTOCOL_FEATURES) == 0 {
            return Ok(());
        }
        let offered = fe
            .get_protocol_features()
            .map_err(step("GET_PROTOCOL_FEATURES"))?;
        self.protocol = offered & wanted_protocol_features();
        fe.set_protocol_features(self.protocol)
            .map_err(step("SET_PROTOCOL_FEATURES"))?;
        if self.protocol.contains(VhostUserProtocolFeatures::MQ) {
            let n = fe.get_queue_num().map_err(step("GET_QUEUE_NUM"))?;
            if n < num_queues as u64 {
                return Err(FsError::Unsupported(format!(
                    "serves {n} queues, {num_queues} are configured (1 high-priority + request queues)"
                )));
            }
        }
        if self.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // From now on every request waits for the backend's acknowledgement.
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        Ok(())
    }

    /// The socket (for the event loop's hang-up watch).
    pub fn socket(&self) -> &UnixStream {
        &self.sock
    }

    /// Whether the watchdog had to cut the connection.
    pub fn timed_out(&self) -> bool {
        self.watchdog.fired()
    }

    /// Cuts the connection: the backend sees end-of-file and stops serving.
    pub fn disconnect(&self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }

    /// Hands the device to the backend: SET_FEATURES (`acked`, plus the protocol-features
    /// bit if the backend offered it), SET_MEM_TABLE (every RAM region with its memfd), then
    /// per queue SET_VRING_NUM/ADDR/BASE/CALL/KICK and, with protocol features,
    /// SET_VRING_ENABLE.
    pub fn start(
        &mut self,
        mem: &GuestMemoryMmap,
        vrings: &[VringSetup],
        kicks: &[EventFd],
        calls: &[EventFd],
        acked: u64,
    ) -> Result<(), FsError> {
        let regions = memory_regions(mem)?;
        let mut addrs = Vec::with_capacity(vrings.len());
        for v in vrings {
            addrs.push(VringConfigData {
                queue_max_size: v.max_size,
                queue_size: v.size,
                flags: 0,
                desc_table_addr: host_address(mem, v.desc_table, "descriptor table")?,
                used_ring_addr: host_address(mem, v.used_ring, "used ring")?,
                avail_ring_addr: host_address(mem, v.avail_ring, "available ring")?,
                log_addr: None,
            });
        }
        let protocol_bit = self.backend_features & (1 << VHOST_USER_F_PROTOCOL_FEATURES);
        let _armed = self.watchdog.arm();
        let fe = &mut self.frontend;
        fe.set_features(acked | protocol_bit)
            .map_err(step("SET_FEATURES"))?;
        fe.set_mem_table(&regions).map_err(step("SET_MEM_TABLE"))?;
        for (i, ((v, addr), (kick, call))) in vrings
            .iter()
            .zip(&addrs)
            .zip(kicks.iter().zip(calls))
            .enumerate()
        {
            fe.set_vring_num(i, v.size).map_err(step("SET_VRING_NUM"))?;
            fe.set_vring_addr(i, addr).map_err(step("SET_VRING_ADDR"))?;
            fe.set_vring_base(i, v.next_avail)
                .map_err(step("SET_VRING_BASE"))?;
            fe.set_vring_call(i, call).map_err(step("SET_VRING_CALL"))?;
            fe.set_vring_kick(i, kick).map_err(step("SET_VRING_KICK"))?;
            if protocol_bit != 0 {
                fe.set_vring_enable(i, true)
                    .map_err(step("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }

    /// Takes the rings back: per queue SET_VRING_ENABLE(0) (with protocol features) and
    /// GET_VRING_BASE, which stops the ring in the backend; then RESET_DEVICE if supported,
    /// so the backend drops the file system session of the old driver.
    pub fn stop(&mut self, num_queues: usize) -> Result<(), FsError> {
        let protocol_bit = self.backend_features & (1 << VHOST_USER_F_PROTOCOL_FEATURES);
        let _armed = self.watchdog.arm();
        let fe = &mut self.frontend;
        for i in 0..num_queues {
            if protocol_bit != 0 {
                fe.set_vring_enable(i, false)
                    .map_err(step("SET_VRING_ENABLE"))?;
            }
            fe.get_vring_base(i).map_err(step("GET_VRING_BASE"))?;
        }
        if self
            .protocol
            .contains(VhostUserProtocolFeatures::RESET_DEVICE)
        {
            fe.reset_device().map_err(step("RESET_DEVICE"))?;
        }
        Ok(())
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // The frontend's own handle closes with it; make sure the backend sees the end even
        // if another handle on the socket survived somewhere.
        self.disconnect();
    }
}

/// Every guest RAM region as the backend must map it: the memfd, the offset of the region
/// in it, its guest address and size, and where we mapped it (ring addresses are given in
/// our address space).
pub(super) fn memory_regions(
    mem: &GuestMemoryMmap,
) -> Result<Vec<VhostUserMemoryRegionInfo>, FsError> {
    let mut regions = Vec::new();
    for r in mem.iter() {
        let start = r.start_addr().0;
        let fo = r.file_offset().ok_or_else(|| {
            FsError::Memory(format!(
                "RAM at {start:#x} is not file-backed, a backend cannot map it"
            ))
        })?;
        let host = r
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| FsError::Memory(e.to_string()))?;
        regions.push(VhostUserMemoryRegionInfo {
            guest_phys_addr: start,
            memory_size: r.len(),
            userspace_addr: host as u64,
            mmap_offset: fo.start(),
            mmap_handle: fo.file().as_raw_fd(),
        });
    }
    Ok(regions)
}

fn host_address(mem: &GuestMemoryMmap, gpa: u64, what: &str) -> Result<u64, FsError> {
    mem.get_host_address(GuestAddress(gpa))
        .map(|p| p as u64)
        .map_err(|e| FsError::Memory(format!("{what} at {gpa:#x}: {e}")))
}
