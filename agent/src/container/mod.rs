//! Containers and their processes: the lifecycle behind the agent API.
//!
//! A container is created from an OCI runtime spec (validated here, then
//! built by a helper process, see [`init`]), started, exec'd into,
//! signalled, waited for and deleted. Each process has its stdio
//! ([`crate::stdio`]) and an exit status published once, when the reaper
//! reports it.

pub mod init;
pub mod spawn;
pub mod user;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use carapace_agent_api::v1::{event, Event, ExitStatus, NamespaceMode, OomEvent, ProcessRef};
use nix::sys::wait::WaitStatus;
use oci_spec::runtime::{LinuxNamespaceType, LinuxResources, Spec};
use tokio::sync::{broadcast, oneshot, watch};

use crate::cgroup::{self, Cgroup, CgroupError, Cgroups};
use crate::stdio::{ChildStdio, ProcessIo, StdioError};
use init::rootfs::RootfsConfig;
use init::{InitConfig, InitKind, Ns};
use spawn::{Pending, SpawnError};

/// How long Delete waits for killed processes to be reaped.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a running container's OOM kill counter is checked.
const OOM_POLL: Duration = Duration::from_secs(1);

/// Errors of container operations; [`ContainerError::code`] maps them to
/// gRPC codes.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("container {0:?} not found")]
    NotFound(String),
    #[error("process {exec_id:?} not found in container {container_id:?}")]
    ProcessNotFound {
        container_id: String,
        exec_id: String,
    },
    #[error("{0} already exists")]
    Exists(String),
    #[error("{0}")]
    State(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("creating container {id:?}: {source}")]
    Create { id: String, source: SpawnError },
    #[error("starting {what}: {source}")]
    Start { what: String, source: SpawnError },
    #[error("{0}")]
    Cgroup(#[from] CgroupError),
    #[error("{0}")]
    Stdio(#[from] StdioError),
    #[error("signalling pid {pid}: {source}")]
    Signal { pid: i32, source: nix::Error },
}

impl ContainerError {
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Self::Invalid(_) | Self::Cgroup(CgroupError::Invalid(_)) => Code::InvalidArgument,
            Self::NotFound(_) | Self::ProcessNotFound { .. } => Code::NotFound,
            Self::Exists(_) => Code::AlreadyExists,
            Self::State(_)
            | Self::Create { .. }
            | Self::Start { .. }
            | Self::Stdio(StdioError::NoStdin | StdioError::NoTerminal | StdioError::OutputBusy)
            | Self::Cgroup(CgroupError::Unsupported(_)) => Code::FailedPrecondition,
            Self::Unsupported(_) => Code::Unimplemented,
            Self::Cgroup(_) | Self::Stdio(_) | Self::Signal { .. } => Code::Internal,
        }
    }
}

type Result<T> = std::result::Result<T, ContainerError>;

/// A running or finished process of a container.
#[derive(Debug)]
pub struct Process {
    pub pid: i32,
    pub io: ProcessIo,
    exit: watch::Receiver<Option<ExitStatus>>,
    /// Its exit status was delivered by WaitProcess.
    pub waited: std::sync::atomic::AtomicBool,
    /// Its output was read to the end.
    pub drained: std::sync::atomic::AtomicBool,
}

impl Process {
    fn new(pid: i32, io: ProcessIo, exit: watch::Receiver<Option<ExitStatus>>) -> Self {
        Self {
            pid,
            io,
            exit,
            waited: Default::default(),
            drained: Default::default(),
        }
    }

    pub fn exited(&self) -> Option<ExitStatus> {
        self.exit.borrow().clone()
    }

    /// Waits for the exit status.
    pub async fn wait(&self) -> ExitStatus {
        let mut rx = self.exit.clone();
        // The tracking task always publishes before it ends, so an error
        // (sender gone) still leaves the final value to read.
        let waited = rx.wait_for(Option::is_some).await.map(|s| s.clone());
        match waited {
            Ok(s) => s.unwrap_or_default(),
            Err(_) => rx.borrow().clone().unwrap_or_default(),
        }
    }
}

#[derive(Debug)]
struct Container {
    init: Arc<Process>,
    /// Set between Create and Start.
    pending: tokio::sync::Mutex<Option<Pending>>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    cgroup: Option<Arc<Cgroup>>,
    new_cgroup_ns: bool,
    /// The container's process: what an exec inherits when its own
    /// process object leaves capabilities, no_new_privs or rlimits out.
    process: oci_spec::runtime::Process,
    /// Also applied to every exec.
    seccomp: Option<oci_spec::runtime::LinuxSeccomp>,
}

/// Where a container's pid namespace comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PidMode {
    /// A new one of its own.
    Container,
    /// The pod's, shared with the other containers that ask for it.
    Pod,
    /// That of another container of the pod (an ephemeral debug container
    /// aimed at it): the target's process must still run.
    Target(String),
}

/// All containers of the pod.
#[derive(Debug)]
pub struct Manager {
    containers: Mutex<HashMap<String, Arc<Container>>>,
    create_lock: tokio::sync::Mutex<()>,
    reaper: Arc<crate::reaper::Reaper>,
    cgroups: Option<Cgroups>,
    /// The pod namespace holder and its start pipe, kept open so that the
    /// holder notices when the agent is gone.
    pod_holder: tokio::sync::Mutex<Option<Pending>>,
    events: broadcast::Sender<Event>,
    shared_root: Mutex<Option<PathBuf>>,
}

/// Container ids become cgroup directory names: keep them plain.
pub fn validate_id(what: &str, id: &str) -> Result<()> {
    if carapace_agent_api::is_valid_id(id) {
        Ok(())
    } else {
        Err(ContainerError::Invalid(format!(
            "{what} {id:?} must match [A-Za-z0-9][A-Za-z0-9_.-]{{0,127}}"
        )))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means a panic elsewhere; the data is intact.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn exit_status(status: Option<WaitStatus>, oom: bool) -> ExitStatus {
    let (exit_code, signal) = match status {
        Some(WaitStatus::Exited(_, code)) => (code, 0),
        Some(WaitStatus::Signaled(_, sig, _)) => (128 + sig as i32, sig as u32),
        _ => (255, 0),
    };
    let reason = if oom {
        "OOMKilled"
    } else if exit_code == 0 {
        "Completed"
    } else {
        "Error"
    };
    let finished_at_unix_nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    ExitStatus {
        exit_code,
        signal,
        reason: reason.into(),
        finished_at_unix_nanos,
    }
}

/// What CreateContainer builds, from the request, before anything changes.
struct Plan {
    rootfs: RootfsConfig,
    seccomp: Option<oci_spec::runtime::LinuxSeccomp>,
    process: oci_spec::runtime::Process,
    resources: Option<LinuxResources>,
    new_cgroup_ns: bool,
}

impl Manager {
    pub fn new(reaper: Arc<crate::reaper::Reaper>) -> Manager {
        let cgroups = Cgroups::detect();
        if cgroups.is_none() {
            tracing::warn!("no cgroup v2 at /sys/fs/cgroup: containers get no resource limits");
        }
        Manager {
            containers: Mutex::default(),
            create_lock: tokio::sync::Mutex::default(),
            reaper,
            cgroups,
            pod_holder: tokio::sync::Mutex::default(),
            events: broadcast::channel(1024).0,
            shared_root: Mutex::default(),
        }
    }

    /// Relative `root.path`s are taken relative to this directory.
    pub fn set_shared_root(&self, path: PathBuf) {
        *lock(&self.shared_root) = Some(path);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    fn container(&self, id: &str) -> Result<Arc<Container>> {
        lock(&self.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| ContainerError::NotFound(id.to_owned()))
    }

    /// The process `r` names.
    pub fn process(&self, r: &ProcessRef) -> Result<Arc<Process>> {
        let c = self.container(&r.container_id)?;
        if r.exec_id.is_empty() {
            return Ok(c.init.clone());
        }
        let found = lock(&c.execs).get(&r.exec_id).cloned();
        found.ok_or_else(|| ContainerError::ProcessNotFound {
            container_id: r.container_id.clone(),
            exec_id: r.exec_id.clone(),
        })
    }

    /// Forgets an exec once its exit status was delivered and its output
    /// read to the end (in either order), so that the execs run for probes
    /// do not accumulate for the container's lifetime.
    pub fn forget_exec_if_done(&self, r: &ProcessRef, p: &Process) {
        use std::sync::atomic::Ordering::SeqCst;
        if r.exec_id.is_empty() || !(p.waited.load(SeqCst) && p.drained.load(SeqCst)) {
            return;
        }
        if let Ok(c) = self.container(&r.container_id) {
            lock(&c.execs).remove(&r.exec_id);
        }
    }

    /// Publishes the exit status of a process when the reaper reports it.
    fn track_exit(
        &self,
        exit: Option<oneshot::Receiver<WaitStatus>>,
        cgroup: Option<Arc<Cgroup>>,
        process: ProcessRef,
    ) -> watch::Receiver<Option<ExitStatus>> {
        let (tx, rx) = watch::channel(None);
        let baseline = cgroup.as_ref().map_or(0, |c| c.oom_kills());
        let events = self.events.clone();
        tokio::spawn(async move {
            let status = match exit {
                Some(rx) => rx.await.ok(),
                None => None,
            };
            let oom = cgroup.is_some_and(|c| c.oom_kills() > baseline);
            let status = exit_status(status, oom);
            tracing::info!(
                container = process.container_id,
                exec = process.exec_id,
                code = status.exit_code,
                reason = status.reason,
                "process exited"
            );
            let _ = tx.send(Some(status.clone()));
            let _ = events.send(Event {
                process: Some(process),
                kind: Some(event::Kind::Exit(status)),
            });
        });
        rx
    }

    /// Publishes an Oom event whenever the container's cgroup counts a new
    /// OOM kill, until its own process exits.
    fn watch_oom(
        &self,
        id: &str,
        cgroup: Arc<Cgroup>,
        mut exit: watch::Receiver<Option<ExitStatus>>,
    ) {
        let events = self.events.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            let mut seen = 0;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(OOM_POLL) => {}
                    changed = exit.changed() => if changed.is_err() || exit.borrow().is_some() {
                        return;
                    },
                }
                let now = cgroup.oom_kills();
                if now > seen {
                    seen = now;
                    tracing::warn!(container = id, oom_kills = now, "OOM kill in container");
                    let _ = events.send(Event {
                        process: Some(ProcessRef {
                            container_id: id.clone(),
                            exec_id: String::new(),
                        }),
                        kind: Some(event::Kind::Oom(OomEvent { oom_kills: now })),
                    });
                }
            }
        });
    }

    fn plan(&self, spec: &Spec) -> Result<Plan> {
        let invalid = |m: String| ContainerError::Invalid(m);
        let process = spec
            .process()
            .clone()
            .ok_or_else(|| invalid("the spec has no process".into()))?;
        if process.args().as_ref().is_none_or(|a| a.is_empty()) {
            return Err(invalid("process.args is empty".into()));
        }
        let root = spec
            .root()
            .as_ref()
            .ok_or_else(|| invalid("the spec has no root".into()))?;
        let rootfs = if root.path().is_absolute() {
            root.path().clone()
        } else {
            let shared = lock(&self.shared_root).clone().ok_or_else(|| {
                invalid(format!(
                    "root.path {} is relative, but no shared filesystem is mounted",
                    root.path().display()
                ))
            })?;
            shared.join(root.path())
        };
        if !rootfs.is_dir() {
            return Err(invalid(format!(
                "root.path {} is not a directory in the guest",
                rootfs.display()
            )));
        }
        // An absent `linux` means none of its settings (not oci-spec's
        // defaults, which `Linux::default()` would bring in).
        let linux: oci_spec::runtime::Linux = match spec.linux() {
            Some(l) => l.clone(),
            None => serde_json::from_str("{}")
                .map_err(|e| invalid(format!("empty linux section: {e}")))?,
        };
        let mut new_cgroup_ns = false;
        for ns in linux.namespaces().iter().flatten() {
            match ns.typ() {
                LinuxNamespaceType::User => {
                    return Err(ContainerError::Unsupported(
                        "user namespaces are not supported yet".into(),
                    ))
                }
                LinuxNamespaceType::Cgroup => new_cgroup_ns = true,
                _ => {}
            }
        }
        if let Some(profile) = linux.seccomp() {
            match init::seccomp::compile(profile) {
                Ok(_) => {}
                Err(e @ init::seccomp::SeccompError::Notify)
                | Err(e @ init::seccomp::SeccompError::Action(_)) => {
                    return Err(ContainerError::Unsupported(e.to_string()))
                }
                Err(e) => return Err(invalid(e.to_string())),
            }
        }
        for m in spec.mounts().iter().flatten() {
            if !m.destination().is_absolute() {
                return Err(invalid(format!(
                    "mount destination {} is not absolute",
                    m.destination().display()
                )));
            }
        }
        let sysctl: std::collections::BTreeMap<String, String> = linux
            .sysctl()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        for key in sysctl.keys() {
            crate::sandbox::validate_sysctl_key(key).map_err(invalid)?;
        }
        let resources = linux.resources().clone();
        if let Some(r) = &resources {
            cgroup::plan(r).map_err(|e| invalid(e.to_string()))?;
            if self.cgroups.is_none() && cgroup::has_limits(r) {
                return Err(ContainerError::State(
                    "resource limits need cgroup v2, which this guest does not have".into(),
                ));
            }
        }
        Ok(Plan {
            seccomp: linux.seccomp().clone(),
            rootfs: RootfsConfig {
                rootfs,
                mounts: spec.mounts().clone().unwrap_or_default(),
                devices: linux.devices().clone().unwrap_or_default(),
                masked_paths: linux.masked_paths().clone().unwrap_or_default(),
                readonly_paths: linux.readonly_paths().clone().unwrap_or_default(),
                readonly: root.readonly().unwrap_or(false),
                hostname: spec.hostname().clone().filter(|h| !h.is_empty()),
                sysctl,
                propagation: linux.rootfs_propagation().clone(),
                console: None,
            },
            process,
            resources,
            new_cgroup_ns,
        })
    }

    /// Starts the holder of the pod's shared namespaces ahead of the first
    /// container, in the background: almost every pod shares its IPC
    /// namespace, and the guest is otherwise idle while the host finishes
    /// RunPodSandbox and prepares the first container's root filesystem,
    /// so this takes the holder's start (a helper exec, ~100 ms under
    /// TCG) out of the first CreateContainer. A container created
    /// meanwhile waits for this start instead of making a second one.
    pub fn prestart_pod_holder(self: &Arc<Self>) {
        let manager = self.clone();
        tokio::spawn(async move {
            if let Err(e) = manager.pod_holder().await {
                tracing::warn!("starting the pod namespace holder ahead of use: {e}");
            }
        });
    }

    /// The pid of the holder of the pod's shared pid and IPC namespaces,
    /// started on first use.
    async fn pod_holder(&self) -> Result<i32> {
        let mut holder = self.pod_holder.lock().await;
        if let Some(pending) = holder.as_ref() {
            let pid = pending.pid;
            if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok() {
                return Ok(pid);
            }
        }
        let config = InitConfig {
            kind: InitKind::PodHolder,
            process: None,
            user: user::UserSource::default(),
            cgroup_procs: None,
            join: Vec::new(),
            unshare: vec![Ns::Pid, Ns::Ipc],
            seccomp: None,
        };
        let (pending, _) = spawn::spawn(&self.reaper, &config, ChildStdio::null()?)
            .await
            .map_err(|source| ContainerError::Create {
                id: "(pod namespaces)".into(),
                source,
            })?;
        let pid = pending.pid;
        tracing::info!(pid, "pod pid/ipc namespace holder started");
        *holder = Some(pending);
        Ok(pid)
    }

    /// The pid namespace a container joins for `mode`, if not a new one.
    async fn pid_namespace(&self, mode: &PidMode) -> Result<Option<PathBuf>> {
        let pid = match mode {
            PidMode::Container => return Ok(None),
            PidMode::Pod => self.pod_holder().await?,
            PidMode::Target(target) => {
                let container = lock(&self.containers).get(target).cloned().ok_or_else(|| {
                    ContainerError::NotFound(format!("{target} (the pid namespace target)"))
                })?;
                if container.init.exit.borrow().is_some() {
                    return Err(ContainerError::State(format!(
                        "the pid namespace target {target:?} has exited"
                    )));
                }
                container.init.pid
            }
        };
        Ok(Some(PathBuf::from(format!("/proc/{pid}/ns/pid"))))
    }

    /// CreateContainer. Returns the process's pid.
    pub async fn create(
        &self,
        id: &str,
        spec_json: &str,
        user: user::UserSource,
        pid_mode: PidMode,
        ipc_mode: NamespaceMode,
        stdin: bool,
    ) -> Result<i32> {
        validate_id("container id", id)?;
        let spec: Spec = serde_json::from_str(spec_json)
            .map_err(|e| ContainerError::Invalid(format!("oci_spec_json: {e}")))?;
        let _serial = self.create_lock.lock().await;
        if lock(&self.containers).contains_key(id) {
            return Err(ContainerError::Exists(format!("container {id:?}")));
        }
        let mut plan = self.plan(&spec)?;

        let mut join = Vec::new();
        let mut unshare = vec![Ns::Mount, Ns::Uts];
        match self.pid_namespace(&pid_mode).await? {
            Some(path) => join.push((Ns::Pid, path)),
            None => unshare.push(Ns::Pid),
        }
        if ipc_mode == NamespaceMode::Pod {
            let holder = self.pod_holder().await?;
            join.push((Ns::Ipc, PathBuf::from(format!("/proc/{holder}/ns/ipc"))));
        } else {
            unshare.push(Ns::Ipc);
        }

        let cgroup = match &self.cgroups {
            Some(c) => Some(Arc::new(c.create(id, plan.resources.as_ref())?)),
            None => None,
        };
        let new_cgroup_ns = plan.new_cgroup_ns && cgroup.is_some();
        if new_cgroup_ns {
            unshare.push(Ns::Cgroup);
        }
        let result = self
            .spawn_container(id, &mut plan, cgroup.clone(), join, unshare, user, stdin)
            .await;
        let (pending, io) = match result {
            Ok(r) => r,
            Err(e) => {
                if let Some(c) = &cgroup {
                    if let Err(ce) = c.remove().await {
                        tracing::error!("cleaning up after a failed create: {ce}");
                    }
                }
                return Err(e);
            }
        };
        let mut pending = pending;
        let pid = pending.pid;
        let exit = self.track_exit(
            pending.take_exit(),
            cgroup.clone(),
            ProcessRef {
                container_id: id.to_owned(),
                exec_id: String::new(),
            },
        );
        let container = Container {
            init: Arc::new(Process::new(pid, io, exit)),
            pending: tokio::sync::Mutex::new(Some(pending)),
            execs: Mutex::default(),
            cgroup,
            new_cgroup_ns,
            process: plan.process,
            seccomp: plan.seccomp,
        };
        if let Some(cg) = &container.cgroup {
            self.watch_oom(id, cg.clone(), container.init.exit.clone());
        }
        lock(&self.containers).insert(id.to_owned(), Arc::new(container));
        tracing::info!(container = id, pid, "container created");
        Ok(pid)
    }

    #[allow(clippy::too_many_arguments)]
    async fn spawn_container(
        &self,
        id: &str,
        plan: &mut Plan,
        cgroup: Option<Arc<Cgroup>>,
        join: Vec<(Ns, PathBuf)>,
        unshare: Vec<Ns>,
        user: user::UserSource,
        stdin: bool,
    ) -> Result<(Pending, ProcessIo)> {
        let terminal = plan.process.terminal().unwrap_or(false);
        let (child_stdio, io) = ProcessIo::create(terminal, stdin)?;
        plan.rootfs.console = child_stdio.console.clone();
        let config = InitConfig {
            kind: InitKind::Container(Box::new(plan.rootfs.clone())),
            process: Some(plan.process.clone()),
            user,
            cgroup_procs: cgroup.as_ref().map(|c| c.procs_file()),
            join,
            unshare,
            seccomp: plan.seccomp.clone(),
        };
        let (pending, warnings) = spawn::spawn(&self.reaper, &config, child_stdio)
            .await
            .map_err(|source| ContainerError::Create {
                id: id.to_owned(),
                source,
            })?;
        for w in warnings {
            tracing::warn!(container = id, "{w}");
        }
        Ok((pending, io))
    }

    /// StartContainer.
    pub async fn start(&self, id: &str) -> Result<()> {
        let c = self.container(id)?;
        let pending = c.pending.lock().await.take().ok_or_else(|| {
            ContainerError::State(format!("container {id:?} was already started"))
        })?;
        pending
            .start()
            .await
            .map_err(|source| ContainerError::Start {
                what: format!("container {id:?}"),
                source,
            })?;
        tracing::info!(container = id, "container started");
        Ok(())
    }

    /// ExecProcess. Returns the process's pid.
    pub async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process_json: &str,
        user: user::UserSource,
        stdin: bool,
    ) -> Result<i32> {
        validate_id("exec id", exec_id)?;
        let mut process: oci_spec::runtime::Process = serde_json::from_str(process_json)
            .map_err(|e| ContainerError::Invalid(format!("oci_process_json: {e}")))?;
        if process.args().as_ref().is_none_or(|a| a.is_empty()) {
            return Err(ContainerError::Invalid("process.args is empty".into()));
        }
        let c = self.container(id)?;
        // An exec never gets more than the container's process had.
        if process.capabilities().is_none() {
            process.set_capabilities(c.process.capabilities().clone());
        }
        if process.no_new_privileges().is_none() {
            process.set_no_new_privileges(c.process.no_new_privileges());
        }
        if process.rlimits().is_none() {
            process.set_rlimits(c.process.rlimits().clone());
        }
        if c.pending.lock().await.is_some() || c.init.exited().is_some() {
            return Err(ContainerError::State(format!(
                "container {id:?} is not running"
            )));
        }
        if lock(&c.execs).contains_key(exec_id) {
            return Err(ContainerError::Exists(format!("exec {exec_id:?}")));
        }
        let target = c.init.pid;
        let mut namespaces = vec![Ns::Ipc, Ns::Uts];
        if c.new_cgroup_ns {
            namespaces.push(Ns::Cgroup);
        }
        // The mount namespace last: /proc is the container's after it.
        namespaces.extend([Ns::Pid, Ns::Mount]);
        let join = namespaces
            .into_iter()
            .map(|ns| (ns, format!("/proc/{target}/ns/{}", ns.proc_name()).into()))
            .collect();
        let (child_stdio, io) = ProcessIo::create(process.terminal().unwrap_or(false), stdin)?;
        let config = InitConfig {
            kind: InitKind::Exec,
            process: Some(process),
            user,
            cgroup_procs: c.cgroup.as_ref().map(|c| c.procs_file()),
            join,
            unshare: Vec::new(),
            seccomp: c.seccomp.clone(),
        };
        let what = format!("exec {exec_id:?} in container {id:?}");
        let (mut pending, warnings) = spawn::spawn(&self.reaper, &config, child_stdio)
            .await
            .map_err(|source| ContainerError::Start {
                what: what.clone(),
                source,
            })?;
        for w in warnings {
            tracing::warn!(container = id, exec = exec_id, "{w}");
        }
        let pid = pending.pid;
        let exit = self.track_exit(
            pending.take_exit(),
            c.cgroup.clone(),
            ProcessRef {
                container_id: id.to_owned(),
                exec_id: exec_id.to_owned(),
            },
        );
        lock(&c.execs).insert(exec_id.to_owned(), Arc::new(Process::new(pid, io, exit)));
        if let Err(source) = pending.start().await {
            lock(&c.execs).remove(exec_id);
            return Err(ContainerError::Start { what, source });
        }
        Ok(pid)
    }

    /// SignalProcess. A process that already exited is left alone.
    pub fn signal(&self, r: &ProcessRef, signal: u32) -> Result<()> {
        let sig = i32::try_from(signal)
            .ok()
            .and_then(|s| nix::sys::signal::Signal::try_from(s).ok())
            .ok_or_else(|| ContainerError::Invalid(format!("unknown signal {signal}")))?;
        let p = self.process(r)?;
        if p.exited().is_some() {
            return Ok(());
        }
        match nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid), sig) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(source) => Err(ContainerError::Signal { pid: p.pid, source }),
        }
    }

    /// DeleteContainer: kills (with `force`) and reaps its processes,
    /// removes its cgroup. Its mounts lived in its own mount namespace,
    /// which is gone with its last process.
    pub async fn delete(&self, id: &str, force: bool) -> Result<()> {
        let c = self.container(id)?;
        let pending = c.pending.lock().await.take();
        let running = c.init.exited().is_none();
        if running && pending.is_none() && !force {
            return Err(ContainerError::State(format!(
                "container {id:?} is running: stop it first or delete with force"
            )));
        }
        if let Some(p) = pending {
            p.abandon();
        }
        let kill = |pid: i32| {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        };
        let mut processes = vec![c.init.clone()];
        processes.extend(lock(&c.execs).values().cloned());
        for p in &processes {
            if p.exited().is_none() {
                kill(p.pid);
            }
        }
        if let Some(cg) = &c.cgroup {
            cg.kill_all();
        }
        for p in &processes {
            if tokio::time::timeout(KILL_TIMEOUT, p.wait()).await.is_err() {
                return Err(ContainerError::State(format!(
                    "process {} of container {id:?} did not die within {KILL_TIMEOUT:?}",
                    p.pid
                )));
            }
        }
        if let Some(cg) = &c.cgroup {
            cg.remove().await?;
        }
        lock(&self.containers).remove(id);
        tracing::info!(container = id, "container deleted");
        Ok(())
    }

    fn cgroup_of(&self, id: &str) -> Result<Arc<Cgroup>> {
        self.container(id)?.cgroup.clone().ok_or_else(|| {
            ContainerError::State("this guest has no cgroup v2: no stats or limits".into())
        })
    }

    /// ContainerStats.
    pub fn stats(&self, id: &str) -> Result<carapace_agent_api::v1::ContainerStatsResponse> {
        let cg = self.cgroup_of(id)?;
        let timestamp_unix_nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        Ok(carapace_agent_api::v1::ContainerStatsResponse {
            timestamp_unix_nanos,
            cpu: Some(cg.cpu_stats()),
            memory: Some(cg.memory_stats()),
            pids: Some(cg.pids_stats()),
            io: Some(cg.io_stats()),
        })
    }

    /// UpdateContainerResources.
    pub fn update(&self, id: &str, resources_json: &str) -> Result<()> {
        let r: LinuxResources = serde_json::from_str(resources_json)
            .map_err(|e| ContainerError::Invalid(format!("oci_resources_json: {e}")))?;
        let cg = self.cgroup_of(id)?;
        cg.apply(&r)?;
        tracing::info!(container = id, "resources updated");
        Ok(())
    }
}

/// Whether `path` is absolute and has no `..` (for paths from requests).
pub fn is_clean_absolute(path: &Path) -> bool {
    path.is_absolute()
        && !path
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_plain_names() {
        for ok in ["a", "abc-1.2_3", &"x".repeat(128)] {
            assert!(validate_id("id", ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", ".", "../x", "a/b", "a b", &"x".repeat(129)] {
            assert!(validate_id("id", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn exit_statuses_follow_cri() {
        use nix::sys::signal::Signal;
        use nix::unistd::Pid;
        let p = Pid::from_raw(1);
        let s = exit_status(Some(WaitStatus::Exited(p, 0)), false);
        assert_eq!(
            (s.exit_code, s.signal, s.reason.as_str()),
            (0, 0, "Completed")
        );
        let s = exit_status(Some(WaitStatus::Exited(p, 3)), false);
        assert_eq!((s.exit_code, s.reason.as_str()), (3, "Error"));
        let s = exit_status(Some(WaitStatus::Signaled(p, Signal::SIGKILL, false)), true);
        assert_eq!(
            (s.exit_code, s.signal, s.reason.as_str()),
            (137, 9, "OOMKilled")
        );
        let s = exit_status(Some(WaitStatus::Signaled(p, Signal::SIGTERM, false)), false);
        assert_eq!((s.exit_code, s.signal), (143, 15));
    }
}
