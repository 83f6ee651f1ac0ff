//! The virtio-fs device model: features (what the backend offers, filtered), config space
//! (tag and request queue count), activation and reset through the vhost-user connection.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use seccompiler::BpfProgram;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::metrics::FsMetrics;
use super::vhost_user::{Connection, VringSetup};
use super::{
    FsError, BACKEND_TIMEOUT, CONFIG_SPACE_LEN, TAG_LEN, VIRTIO_ID_FS, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::config::FsConfig;
use crate::devices::virtio::{
    check_queue_count, read_config_space, ActivateError, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1,
};

/// Token of the backend socket in the device's epoll set (queue `i` uses token `i`).
pub(super) const SOCKET_TOKEN: u64 = u64::MAX;

/// The virtio feature bits we let through from the backend to the guest: all of them are
/// ring features the backend implements; nothing here needs us.
const PASSED_FEATURES: u64 =
    (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX);

/// A virtio-fs device served by a vhost-user backend.
pub struct Fs {
    config_space: [u8; CONFIG_SPACE_LEN],
    queue_sizes: Vec<u16>,
    pub(super) conn: Connection,
    avail_features: u64,
    acked_features: u64,
    /// Clones of the transport's queue eventfds (KVM ioeventfds): the backend's kick fds.
    kicks: Vec<EventFd>,
    /// Our eventfds the backend signals when it used buffers (its call fds).
    pub(super) calls: Vec<EventFd>,
    /// Holds `calls` and the backend socket; its fd is the device's backend fd.
    pub(super) epoll: Epoll,
    /// Set while activated.
    pub(super) interrupt: Option<Arc<dyn VirtioInterrupt>>,
    /// The connection failed; only a new VMM can talk to a backend again.
    pub(super) broken: bool,
    pub(super) metrics: Arc<FsMetrics>,
}

impl std::fmt::Debug for Fs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fs")
            .field("queues", &self.queue_sizes.len())
            .field("activated", &self.interrupt.is_some())
            .field("broken", &self.broken)
            .finish()
    }
}

fn setup_err(what: &'static str) -> impl FnOnce(std::io::Error) -> FsError {
    move |source| FsError::Setup { what, source }
}

impl Fs {
    /// Connects to the backend of `cfg` and negotiates the session (see
    /// [`Connection::connect`]).
    /// `watchdog_filter`: the seccomp filter the connection's watchdog thread installs on
    /// itself ([`ThreadKind::Watchdog`](crate::seccomp::ThreadKind); `None` with seccomp off).
    pub fn new(cfg: &FsConfig, watchdog_filter: Option<Arc<BpfProgram>>) -> Result<Self, FsError> {
        Self::with_timeout(cfg, BACKEND_TIMEOUT, watchdog_filter)
    }

    /// [`Self::new`] with another bound on each backend exchange.
    pub fn with_timeout(
        cfg: &FsConfig,
        timeout: Duration,
        watchdog_filter: Option<Arc<BpfProgram>>,
    ) -> Result<Self, FsError> {
        let num_queues = 1 + usize::from(cfg.num_request_queues);
        let conn = Connection::connect(&cfg.socket, num_queues, timeout, watchdog_filter)?;
        if conn.backend_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(FsError::Unsupported(
                "does not offer VIRTIO_F_VERSION_1".into(),
            ));
        }
        let mut config_space = [0u8; CONFIG_SPACE_LEN];
        let tag = cfg.tag.as_bytes();
        let tag_len = tag.len().min(TAG_LEN);
        config_space[..tag_len].copy_from_slice(&tag[..tag_len]);
        config_space[TAG_LEN..].copy_from_slice(&u32::from(cfg.num_request_queues).to_le_bytes());

        let epoll = Epoll::new().map_err(setup_err("the virtio-fs epoll set"))?;
        let mut calls = Vec::with_capacity(num_queues);
        for i in 0..num_queues {
            let evt =
                EventFd::new(libc::EFD_NONBLOCK).map_err(setup_err("a virtio-fs call eventfd"))?;
            epoll
                .ctl(
                    ControlOperation::Add,
                    evt.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, i as u64),
                )
                .map_err(setup_err("the virtio-fs epoll set"))?;
            calls.push(evt);
        }
        // Only hang-ups: replies are read by whoever sent the request.
        epoll
            .ctl(
                ControlOperation::Add,
                conn.socket().as_raw_fd(),
                EpollEvent::new(EventSet::READ_HANG_UP, SOCKET_TOKEN),
            )
            .map_err(setup_err("the virtio-fs epoll set"))?;
        Ok(Self {
            config_space,
            queue_sizes: vec![cfg.queue_size; num_queues],
            avail_features: conn.backend_features & PASSED_FEATURES,
            conn,
            acked_features: 0,
            kicks: Vec::new(),
            calls,
            epoll,
            interrupt: None,
            broken: false,
            metrics: Arc::default(),
        })
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<FsMetrics> {
        self.metrics.clone()
    }

    /// Marks the connection unusable and cuts it, so the backend stops whatever it was
    /// doing with our rings.
    pub(super) fn break_connection(&mut self, why: &dyn std::fmt::Display) {
        if !self.broken {
            tracing::warn!("virtio-fs backend failed: {why}; the device needs a reset");
            self.broken = true;
        }
        self.conn.disconnect();
    }

    fn start_backend(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: &[Queue],
    ) -> Result<(), ActivateError> {
        check_queue_count(queues.len(), self.queue_sizes.len())?;
        if self.broken {
            return Err(ActivateError::Backend(FsError::Broken.to_string()));
        }
        if self.kicks.len() != queues.len() {
            return Err(ActivateError::Backend(
                "the queue notification eventfds were not handed over".into(),
            ));
        }
        // Calls left over from before a reset mean nothing now.
        for call in &self.calls {
            let _ = call.read();
        }
        let vrings: Vec<VringSetup> = queues.iter().map(VringSetup::of).collect();
        if let Err(e) = self
            .conn
            .start(mem, &vrings, &self.kicks, &self.calls, self.acked_features)
        {
            self.metrics.backend_errors.fetch_add(1, Ordering::Relaxed);
            self.break_connection(&e);
            return Err(ActivateError::Backend(e.to_string()));
        }
        Ok(())
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config_space, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The virtio-fs configuration space is read-only.
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        match self.start_backend(&mem, &queues) {
            Ok(()) => {
                self.interrupt = Some(interrupt);
                self.metrics.activations.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.metrics
                    .activation_errors
                    .fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    fn reset(&mut self) -> bool {
        if self.interrupt.take().is_some() && !self.broken {
            if let Err(e) = self.conn.stop(self.queue_sizes.len()) {
                self.metrics.backend_errors.fetch_add(1, Ordering::Relaxed);
                self.break_connection(&e);
            }
        }
        self.acked_features = 0;
        self.metrics.resets.fetch_add(1, Ordering::Relaxed);
        // Even with a broken backend nothing of the old driver is left here (and the cut
        // connection stops the backend), so the transport may reset.
        true
    }

    fn is_activated(&self) -> bool {
        self.interrupt.is_some()
    }

    fn process_queue(&mut self, _index: usize) {
        // The backend reads the queue notifications itself (`take_queue_evts`).
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    fn process_backend(&mut self) {
        self.handle_backend_events();
    }

    fn metrics_json(&self) -> serde_json::Value {
        serde_json::to_value(&*self.metrics).unwrap_or_default()
    }

    fn take_queue_evts(&mut self, evts: &[EventFd]) -> bool {
        match evts.iter().map(EventFd::try_clone).collect() {
            Ok(kicks) => self.kicks = kicks,
            Err(e) => self.break_connection(&format!("cannot clone a queue eventfd: {e}")),
        }
        true
    }

    fn needs_reset(&self) -> bool {
        self.broken
    }
}
