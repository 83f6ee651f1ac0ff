//! vCPUs: configuration for the boot protocol, and the run loop each runs on its own thread.
//!
//! Stopping and pausing: the controller sets the wanted state in [`RunControl`] and kicks
//! the thread with a real-time signal, repeating until the thread acknowledges, so a kick
//! that lands just before `KVM_RUN` is never lost for long.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuExit, VcpuFd};
use seccompiler::BpfProgram;
use serde::Serialize;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::x86_64::{cpuid, regs};
use crate::devices::Bus;
use crate::seccomp::{self, ThreadKind};
use crate::vstate::vm::Vm;

/// Errors creating or running vCPUs.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// `KVM_CREATE_VCPU` or `KVM_GET_SUPPORTED_CPUID` failed.
    #[error("cannot {what}: {source}")]
    Kvm {
        /// Which step.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Register setup failed.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// The kick signal handler cannot be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// The thread cannot be spawned.
    #[error("cannot spawn vCPU thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitReason {
    /// The guest reset the CPU (i8042 reset, `reboot=k`): for a microVM that means "done".
    Reset,
    /// The guest shut down (triple fault, or a KVM system event).
    Shutdown,
    /// A vCPU halted with no in-kernel irqchip to wake it.
    Halted,
    /// The VMM was asked to stop (signal or API).
    Stopped,
    /// KVM reported an error the guest cannot recover from.
    Error(String),
}

/// Exits per kind, per vCPU.
#[derive(Debug, Default, Serialize)]
pub struct VcpuMetrics {
    /// `in` instructions.
    pub io_in: AtomicU64,
    /// `out` instructions.
    pub io_out: AtomicU64,
    /// MMIO reads.
    pub mmio_read: AtomicU64,
    /// MMIO writes.
    pub mmio_write: AtomicU64,
    /// Accesses no device claimed.
    pub unhandled: AtomicU64,
    /// `KVM_RUN` interrupted by a kick.
    pub interrupted: AtomicU64,
    /// Other exits.
    pub other: AtomicU64,
}

/// What the controller wants the vCPUs to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Stop,
}

#[derive(Debug)]
struct ControlState {
    want: Want,
    paused: usize,
    exited: usize,
}

/// Shared run state of all vCPUs, and where the first exit reason is recorded.
#[derive(Debug)]
pub struct RunControl {
    state: Mutex<ControlState>,
    cv: Condvar,
    reason: Mutex<Option<ExitReason>>,
    exit_evt: EventFd,
}

impl RunControl {
    /// A controller that signals `exit_evt` when the VM should end.
    pub fn new(exit_evt: EventFd) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(ControlState {
                want: Want::Run,
                paused: 0,
                exited: 0,
            }),
            cv: Condvar::new(),
            reason: Mutex::new(None),
            exit_evt,
        })
    }

    /// Records why the VM ends (the first reason wins) and wakes the event loop.
    pub fn request_exit(&self, reason: ExitReason) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            *r = Some(reason);
        }
        let _ = self.exit_evt.write(1);
    }

    /// The recorded exit reason.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A configured vCPU, not yet running.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    metrics: Arc<VcpuMetrics>,
}

impl Vcpu {
    /// Creates vCPU `id` of `count` and sets it up to enter the kernel at `entry` with the
    /// page tables at `cr3`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vm: &Vm,
        supported_cpuid: &CpuId,
        id: u8,
        count: u8,
        entry: u64,
        cr3: u64,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
    ) -> Result<Self, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(id))
            .map_err(|source| VcpuError::Kvm {
                what: "create a vCPU",
                source,
            })?;
        let mut cpuid = supported_cpuid.clone();
        let tsc_deadline = vm.kvm().check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
        cpuid::adjust_for_vcpu(&mut cpuid, id, count, tsc_deadline);
        fd.set_cpuid2(&cpuid).map_err(|source| VcpuError::Kvm {
            what: "set CPUID",
            source,
        })?;
        regs::setup_msrs(&fd)?;
        regs::setup_regs(&fd, entry)?;
        regs::setup_sregs(&fd, cr3)?;
        regs::setup_fpu(&fd)?;
        regs::setup_lapic(&fd)?;
        Ok(Vcpu {
            id,
            fd,
            pio,
            mmio,
            metrics: Arc::default(),
        })
    }

    /// This vCPU's exit counters.
    pub fn metrics(&self) -> Arc<VcpuMetrics> {
        self.metrics.clone()
    }

    /// The vCPU index.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Starts the run loop on its thread, made by [`VcpuThread::spawn`] (which installed the
    /// vCPU seccomp filter first, if asked to).
    pub fn start_on(
        self,
        thread: VcpuThread,
        control: Arc<RunControl>,
    ) -> Result<VcpuHandle, VcpuError> {
        let id = self.id;
        thread.start.send((self, control)).map_err(|_| {
            VcpuError::Spawn(std::io::Error::other(format!(
                "vCPU thread {} exited before its start",
                thread.id
            )))
        })?;
        Ok(VcpuHandle {
            id,
            thread: thread.thread,
        })
    }

    fn run(mut self, control: Arc<RunControl>) {
        loop {
            {
                let mut st = control.lock();
                while st.want == Want::Pause {
                    st.paused += 1;
                    control.cv.notify_all();
                    st = control.cv.wait(st).unwrap_or_else(|e| e.into_inner());
                    st.paused -= 1;
                }
                if st.want == Want::Stop {
                    self.log_state();
                    st.exited += 1;
                    control.cv.notify_all();
                    return;
                }
            }
            if let Some(reason) = self.run_once() {
                control.request_exit(reason);
                let mut st = control.lock();
                // Park until the controller stops (or pauses, then resumes) everyone.
                while st.want == Want::Run {
                    st = control.cv.wait(st).unwrap_or_else(|e| e.into_inner());
                }
            }
        }
    }

    /// Where the vCPU was when it stopped: the first thing to look at when a guest hangs.
    fn log_state(&self) {
        if !tracing::enabled!(tracing::Level::DEBUG) {
            return;
        }
        let (Ok(regs), Ok(sregs)) = (self.fd.get_regs(), self.fd.get_sregs()) else {
            return;
        };
        tracing::debug!(
            vcpu = self.id,
            rip = format_args!("{:#x}", regs.rip),
            rsp = format_args!("{:#x}", regs.rsp),
            rflags = format_args!("{:#x}", regs.rflags),
            cr0 = format_args!("{:#x}", sregs.cr0),
            cr3 = format_args!("{:#x}", sregs.cr3),
            cr4 = format_args!("{:#x}", sregs.cr4),
            efer = format_args!("{:#x}", sregs.efer),
            exits = ?self.metrics,
            "vCPU state at stop"
        );
    }

    /// One `KVM_RUN`; returns a reason if the VM should end.
    fn run_once(&mut self) -> Option<ExitReason> {
        let m = &self.metrics;
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                m.io_in.fetch_add(1, Ordering::Relaxed);
                if !self.pio.read(u64::from(port), data) {
                    data.fill(0xff);
                    m.unhandled.fetch_add(1, Ordering::Relaxed);
                }
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                m.io_out.fetch_add(1, Ordering::Relaxed);
                if !self.pio.write(u64::from(port), data) {
                    m.unhandled.fetch_add(1, Ordering::Relaxed);
                }
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                m.mmio_read.fetch_add(1, Ordering::Relaxed);
                if !self.mmio.read(addr, data) {
                    data.fill(0);
                    m.unhandled.fetch_add(1, Ordering::Relaxed);
                }
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                m.mmio_write.fetch_add(1, Ordering::Relaxed);
                if !self.mmio.write(addr, data) {
                    m.unhandled.fetch_add(1, Ordering::Relaxed);
                }
                None
            }
            Ok(VcpuExit::Hlt) => Some(ExitReason::Halted),
            Ok(VcpuExit::Shutdown) => Some(ExitReason::Shutdown),
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                if kind == kvm_bindings::KVM_SYSTEM_EVENT_RESET {
                    Some(ExitReason::Reset)
                } else {
                    Some(ExitReason::Shutdown)
                }
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(ExitReason::Error(format!(
                "vCPU {} failed to enter the guest (reason {reason:#x}, cpu {cpu})",
                self.id
            ))),
            Ok(VcpuExit::InternalError) => Some(ExitReason::Error(format!(
                "KVM internal error on vCPU {}",
                self.id
            ))),
            Ok(other) => {
                m.other.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(vcpu = self.id, exit = ?other, "unexpected vCPU exit");
                None
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                m.interrupted.fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(e) => Some(ExitReason::Error(format!(
                "KVM_RUN on vCPU {}: {e}",
                self.id
            ))),
        }
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

fn install_kick_handler() -> Result<(), VcpuError> {
    static INSTALLED: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(kick_signal(), kick_handler).map_err(|e| e.errno()))
        .map_err(|errno| VcpuError::Signal(vmm_sys_util::errno::Error::new(errno)))
}

/// A vCPU thread that does not run a vCPU yet: it installs its seccomp filter, then waits
/// for [`Vcpu::start_on`]. Spawned while the VM is still being built, its creation and
/// filter install overlap the build instead of delaying the first `KVM_RUN`. Dropped
/// unused, the thread exits.
#[derive(Debug)]
pub struct VcpuThread {
    id: u8,
    thread: JoinHandle<()>,
    start: mpsc::Sender<(Vcpu, Arc<RunControl>)>,
}

impl VcpuThread {
    /// Spawns the thread of vCPU `id`; with a `filter` (the vCPU seccomp filter) it installs
    /// it on itself first.
    pub fn spawn(id: u8, filter: Option<Arc<BpfProgram>>) -> Result<Self, VcpuError> {
        install_kick_handler()?;
        let (start, started) = mpsc::channel::<(Vcpu, Arc<RunControl>)>();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                let filtered = match &filter {
                    Some(filter) => seccomp::apply(ThreadKind::Vcpu, filter),
                    None => Ok(()),
                };
                let Ok((vcpu, control)) = started.recv() else {
                    return;
                };
                if let Err(e) = filtered {
                    control.request_exit(ExitReason::Error(e.to_string()));
                    let mut st = control.lock();
                    st.exited += 1;
                    control.cv.notify_all();
                    return;
                }
                vcpu.run(control)
            })
            .map_err(VcpuError::Spawn)?;
        Ok(Self { id, thread, start })
    }
}

/// A running vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    id: u8,
    thread: JoinHandle<()>,
}

impl VcpuHandle {
    /// The vCPU index.
    pub fn id(&self) -> u8 {
        self.id
    }
}

/// How long a pause or stop may take before we give up waiting.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
const KICK_INTERVAL: Duration = Duration::from_millis(5);

fn set_want_and_wait(
    control: &RunControl,
    handles: &[VcpuHandle],
    want: Want,
    done: impl Fn(&ControlState) -> bool,
) -> bool {
    control.lock().want = want;
    control.cv.notify_all();
    let deadline = Instant::now() + ACK_TIMEOUT;
    loop {
        for h in handles {
            if !h.thread.is_finished() {
                let _ = h.thread.kill(kick_signal());
            }
        }
        let st = control.lock();
        if done(&st) {
            return true;
        }
        let (st, _) = control
            .cv
            .wait_timeout(st, KICK_INTERVAL)
            .unwrap_or_else(|e| e.into_inner());
        if done(&st) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
    }
}

/// Pauses all vCPUs; true once every one is parked.
pub fn pause_all(control: &RunControl, handles: &[VcpuHandle]) -> bool {
    let n = handles.len();
    set_want_and_wait(control, handles, Want::Pause, |st| {
        st.paused + st.exited >= n
    })
}

/// Resumes paused vCPUs.
pub fn resume_all(control: &RunControl) {
    let mut st = control.lock();
    if st.want == Want::Pause {
        st.want = Want::Run;
    }
    control.cv.notify_all();
}

/// Stops all vCPUs and joins their threads; false if one did not stop in time.
pub fn stop_all(control: &RunControl, handles: Vec<VcpuHandle>) -> bool {
    let n = handles.len();
    let ok = set_want_and_wait(control, &handles, Want::Stop, |st| st.exited >= n);
    if ok {
        for h in handles {
            let _ = h.thread.join();
        }
    }
    ok
}
