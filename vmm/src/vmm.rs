//! The running VM: vCPU threads plus one event loop thread (the caller of [`Vmm::run`])
//! that serves virtio queue notifications, device backends, the control API, and the
//! reset/exit/stop events.

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{json, Value};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::api::{ApiRequest, ApiServer};
use crate::config::VmConfig;
use crate::devices::legacy::Serial;
use crate::devices::virtio::MmioTransport;
use crate::seccomp::{self, SeccompError, ThreadKind};
use crate::vstate::vcpu::{
    pause_all, resume_all, stop_all, ExitReason, RunControl, Vcpu, VcpuError, VcpuHandle,
    VcpuMetrics, VcpuThread,
};
use crate::vstate::vm::Vm;

/// Errors running the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Starting a vCPU failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The event loop's epoll failed.
    #[error("event loop: {0}")]
    Epoll(#[source] std::io::Error),
    /// A seccomp filter cannot be prepared or installed.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// The control API socket cannot be created.
    #[error("cannot create the API socket {path}: {source}")]
    Api {
        /// The path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A virtio device on the MMIO bus.
#[derive(Debug)]
pub struct VirtioSlot {
    /// The transport (and the device inside it).
    pub transport: Arc<Mutex<MmioTransport>>,
    /// MMIO base address.
    pub base: u64,
    /// Interrupt line.
    pub gsi: u32,
}

/// Everything [`crate::builder::build_vm`] made.
pub struct VmmParts {
    /// The KVM VM.
    pub vm: Vm,
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// vCPU run control.
    pub control: Arc<RunControl>,
    /// Signalled by a vCPU when the VM should end.
    pub exit_evt: EventFd,
    /// Signalled by the i8042 on a CPU reset.
    pub reset_evt: EventFd,
    /// Signalled by a [`StopHandle`].
    pub stop_evt: EventFd,
    /// Configured vCPUs.
    pub vcpus: Vec<Vcpu>,
    /// Their threads, if already spawned (one per vCPU, in order); empty: spawned by
    /// [`Vmm::start`].
    pub vcpu_threads: Vec<VcpuThread>,
    /// The console.
    pub serial: Arc<Mutex<Serial>>,
    /// Virtio devices.
    pub slots: Vec<VirtioSlot>,
    /// The final kernel command line.
    pub cmdline: String,
    /// The configuration it was built from.
    pub config: VmConfig,
}

const TOKEN_EXIT: u64 = 0;
const TOKEN_RESET: u64 = 1;
const TOKEN_STOP: u64 = 2;
const TOKEN_API: u64 = 3;
const TOKEN_DEVICE_BASE: u64 = 1 << 16;
/// Per-device token block: queue `q` is `base + q`, the backend is `base + BACKEND`.
const TOKENS_PER_DEVICE: u64 = 64;
const BACKEND: u64 = TOKENS_PER_DEVICE - 1;

/// A VM built and ready to run (or running).
pub struct Vmm {
    // Field order is drop order: vCPU threads are stopped in `Drop`, then devices, the VM
    // (which must go before the memory it maps), and finally guest memory.
    api: Option<ApiServer>,
    slots: Vec<VirtioSlot>,
    serial: Arc<Mutex<Serial>>,
    handles: Vec<VcpuHandle>,
    pending: Vec<Vcpu>,
    pending_threads: Vec<VcpuThread>,
    vcpu_metrics: Vec<Arc<VcpuMetrics>>,
    control: Arc<RunControl>,
    exit_evt: EventFd,
    reset_evt: EventFd,
    stop_evt: EventFd,
    vm: Vm,
    mem: GuestMemoryMmap,
    cmdline: String,
    config: VmConfig,
    started: Option<Instant>,
    paused: bool,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("vcpus", &self.vcpu_metrics.len())
            .field("devices", &self.slots.len())
            .finish()
    }
}

/// Asks a running [`Vmm`] to stop from another thread (a signal handler thread, a test).
#[derive(Debug)]
pub struct StopHandle(EventFd);

impl StopHandle {
    /// Requests a clean stop.
    pub fn stop(&self) {
        let _ = self.0.write(1);
    }
}

impl Vmm {
    /// Wraps the built parts.
    pub fn new(p: VmmParts) -> Self {
        let vcpu_metrics = p.vcpus.iter().map(|v| v.metrics()).collect();
        Self {
            api: None,
            slots: p.slots,
            serial: p.serial,
            handles: Vec::new(),
            pending: p.vcpus,
            pending_threads: p.vcpu_threads,
            vcpu_metrics,
            control: p.control,
            exit_evt: p.exit_evt,
            reset_evt: p.reset_evt,
            stop_evt: p.stop_evt,
            vm: p.vm,
            mem: p.mem,
            cmdline: p.cmdline,
            config: p.config,
            started: None,
            paused: false,
        }
    }

    /// The kernel command line the guest gets.
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// Guest memory (tests inspect it).
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The KVM VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// A handle that makes [`Self::run`] return with [`ExitReason::Stopped`].
    pub fn stop_handle(&self) -> std::io::Result<StopHandle> {
        Ok(StopHandle(self.stop_evt.try_clone()?))
    }

    /// Serves the control API on `path` while running.
    pub fn enable_api(&mut self, path: &Path) -> Result<(), VmmError> {
        let server = ApiServer::bind(path).map_err(|source| VmmError::Api {
            path: path.display().to_string(),
            source,
        })?;
        self.api = Some(server);
        Ok(())
    }

    /// Starts every vCPU on its thread: the one spawned while building, or a new one (each
    /// installs the vCPU seccomp filter on itself first, unless `seccomp` is off in the
    /// configuration).
    pub fn start(&mut self) -> Result<(), VmmError> {
        self.spawn_vcpu_threads()?;
        self.hand_over_vcpus()
    }

    /// Spawns the vCPU threads unless `build_vm` already did.
    fn spawn_vcpu_threads(&mut self) -> Result<(), VmmError> {
        if self.pending_threads.len() == self.pending.len() {
            return Ok(());
        }
        self.pending_threads.clear();
        let filter = if self.config.seccomp {
            Some(Arc::new(seccomp::filter(ThreadKind::Vcpu)?))
        } else {
            None
        };
        for vcpu in &self.pending {
            self.pending_threads
                .push(VcpuThread::spawn(vcpu.id(), filter.clone())?);
        }
        Ok(())
    }

    /// Gives each spawned thread its vCPU: from here on the guest runs.
    fn hand_over_vcpus(&mut self) -> Result<(), VmmError> {
        self.started = Some(Instant::now());
        for (vcpu, thread) in self.pending.drain(..).zip(self.pending_threads.drain(..)) {
            self.handles
                .push(vcpu.start_on(thread, self.control.clone())?);
        }
        Ok(())
    }

    fn epoll_add(epoll: &Epoll, fd: RawFd, token: u64) -> Result<(), VmmError> {
        epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
            .map_err(VmmError::Epoll)
    }

    /// Runs the event loop until the guest resets or shuts down, a vCPU fails, or a stop
    /// is requested; then stops the vCPUs and returns why.
    ///
    /// Unless `seccomp` is off in the configuration, the calling thread installs the
    /// event-loop filter on itself before serving anything, for good: afterwards it may only
    /// tear the VM down and exit (the binary's main thread), so tests call this on a thread
    /// of its own. Unless [`Self::start`] was called first, the vCPUs get to run only once
    /// that filter is on (their threads are spawned before it, as it forbids `clone`), so
    /// the guest never runs beside an unfiltered thread, as in Firecracker.
    pub fn run(&mut self) -> Result<ExitReason, VmmError> {
        let starting = self.started.is_none();
        if starting {
            self.spawn_vcpu_threads()?;
        }
        let epoll = Epoll::new().map_err(VmmError::Epoll)?;
        Self::epoll_add(&epoll, self.exit_evt.as_raw_fd(), TOKEN_EXIT)?;
        Self::epoll_add(&epoll, self.reset_evt.as_raw_fd(), TOKEN_RESET)?;
        Self::epoll_add(&epoll, self.stop_evt.as_raw_fd(), TOKEN_STOP)?;
        if let Some(api) = &self.api {
            Self::epoll_add(&epoll, api.as_raw_fd(), TOKEN_API)?;
        }
        for (i, slot) in self.slots.iter().enumerate() {
            let t = slot.transport.lock().unwrap_or_else(|e| e.into_inner());
            let base = TOKEN_DEVICE_BASE + i as u64 * TOKENS_PER_DEVICE;
            // A vhost-user backend reads its kicks itself; reading them here would steal them.
            if !t.notifications_external() {
                for (q, evt) in t.queue_evts().iter().enumerate() {
                    Self::epoll_add(&epoll, evt.as_raw_fd(), base + q as u64)?;
                }
            }
            if let Some(fd) = t.device().backend_fd() {
                Self::epoll_add(&epoll, fd, base + BACKEND)?;
            }
        }
        if self.config.seccomp {
            seccomp::install(ThreadKind::Vmm)?;
        }
        if starting {
            self.hand_over_vcpus()?;
        }

        let mut events = vec![EpollEvent::default(); 64];
        let reason = 'outer: loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(VmmError::Epoll(e)),
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_EXIT => {
                        let _ = self.exit_evt.read();
                        break 'outer self.control.exit_reason().unwrap_or(ExitReason::Stopped);
                    }
                    TOKEN_RESET => {
                        let _ = self.reset_evt.read();
                        break 'outer ExitReason::Reset;
                    }
                    TOKEN_STOP => {
                        let _ = self.stop_evt.read();
                        break 'outer ExitReason::Stopped;
                    }
                    TOKEN_API => {
                        if self.serve_api() {
                            break 'outer ExitReason::Stopped;
                        }
                    }
                    token => self.device_event(token - TOKEN_DEVICE_BASE),
                }
            }
        };
        self.shutdown();
        tracing::info!(?reason, "VM stopped");
        Ok(reason)
    }

    fn device_event(&mut self, token: u64) {
        let (index, sub) = (
            (token / TOKENS_PER_DEVICE) as usize,
            token % TOKENS_PER_DEVICE,
        );
        let Some(slot) = self.slots.get(index) else {
            return;
        };
        let mut t = slot.transport.lock().unwrap_or_else(|e| e.into_inner());
        if sub == BACKEND {
            t.device_mut().process_backend();
            return;
        }
        if let Some(evt) = t.queue_evts().get(sub as usize) {
            let _ = evt.read();
        }
        if t.device().is_activated() {
            t.device_mut().process_queue(sub as usize);
        }
    }

    /// Handles one API connection; true if it asked for shutdown.
    fn serve_api(&mut self) -> bool {
        let Some(api) = &self.api else {
            return false;
        };
        let Some((req, conn)) = api.accept() else {
            return false;
        };
        let (resp, stop) = match req {
            Ok(ApiRequest::Status) => (self.status(), false),
            Ok(ApiRequest::Metrics) => (self.metrics(), false),
            Ok(ApiRequest::Pause) => {
                let ok = self.paused || pause_all(&self.control, &self.handles);
                self.paused = ok;
                (json!({"ok": ok}), false)
            }
            Ok(ApiRequest::Resume) => {
                resume_all(&self.control);
                self.paused = false;
                (json!({"ok": true}), false)
            }
            Ok(ApiRequest::Shutdown) => (json!({"ok": true}), true),
            Err(e) => (json!({"ok": false, "error": e}), false),
        };
        ApiServer::respond(conn, &resp);
        stop
    }

    /// `status` API answer.
    pub fn status(&self) -> Value {
        json!({
            "ok": true,
            "state": if self.paused { "paused" } else { "running" },
            "vcpus": self.config.vcpus,
            "mem_size_mib": self.config.mem_size_mib,
            "uptime_ms": self.started.map_or(0, |s| s.elapsed().as_millis() as u64),
            "cmdline": self.cmdline,
        })
    }

    /// `metrics` API answer: exits per vCPU, console and device counters.
    pub fn metrics(&self) -> Value {
        let serial = self
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .metrics();
        let devices: Vec<Value> = self
            .slots
            .iter()
            .map(|s| {
                let t = s.transport.lock().unwrap_or_else(|e| e.into_inner());
                json!({
                    "type": t.device().device_type(),
                    "mmio_base": s.base,
                    "irq": s.gsi,
                    "activated": t.device().is_activated(),
                    "invalid_register_accesses": t.invalid_accesses(),
                    "counters": t.device().metrics_json(),
                })
            })
            .collect();
        json!({
            "ok": true,
            "vcpus": self.vcpu_metrics.iter().map(|m| serde_json::to_value(&**m).unwrap_or_default()).collect::<Vec<_>>(),
            "serial": {
                "tx_bytes": serial.tx_bytes.load(Ordering::Relaxed),
                "errors": serial.errors.load(Ordering::Relaxed),
            },
            "devices": devices,
        })
    }

    /// Exit counters of each vCPU.
    pub fn vcpu_metrics(&self) -> &[Arc<VcpuMetrics>] {
        &self.vcpu_metrics
    }

    fn shutdown(&mut self) {
        resume_all(&self.control);
        let handles = std::mem::take(&mut self.handles);
        if !handles.is_empty() && !stop_all(&self.control, handles) {
            tracing::warn!("a vCPU did not stop in time");
        }
        self.serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .flush();
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.shutdown();
    }
}
