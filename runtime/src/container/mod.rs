//! Containers: created in their pod's VM by the agent, recorded on disk,
//! watched until they exit, their output written to kubelet's log files.
//!
//! A container's root filesystem is an overlay mounted on the host inside
//! the pod's virtio-fs share (`<share>/<id>/rootfs`); its volumes are bound
//! next to it (see [`volumes`]); the agent sees them under
//! [`GUEST_SHARE_DIR`]. While a container runs, two tasks serve it: one
//! copies its output from the agent into the CRI log, one waits for its
//! exit and records it. A restarted daemon starts them again for the
//! containers it finds running.
//!
//! Operations on one container are serialised by its own lock; the pod's
//! lock is taken only briefly, never while a container's is held.

pub mod log;
pub mod record;
pub mod spec;
pub mod stream;
pub mod volumes;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use carapace_agent_api::v1::{
    ContainerStatsRequest, ContainerStatsResponse, CreateContainerRequest, DeleteContainerRequest,
    ExitStatus, OutputStream, ProcessRef, ReadOutputRequest, SignalProcessRequest,
    StartContainerRequest, UpdateContainerResourcesRequest, WaitProcessRequest,
};
use k8s_cri::v1::ContainerConfig;
use tokio::sync::{broadcast, mpsc, oneshot, watch, Mutex};

pub use record::{ContainerRecord, ContainerState, MountRecord, ProcessIdentity};

use crate::agent_client::AgentClient;
use crate::config::Config;
use crate::image::{rootfs, ImageStore};
use crate::sandbox::{now_ns, SandboxError, Sandboxes};
use crate::state::{RecordDir, StateError};

/// Where the agent mounts the pod's virtio-fs share in the guest.
pub const GUEST_SHARE_DIR: &str = carapace_agent_api::SHARED_FS_MOUNT_POINT;

/// How long the exit of a container waits for its log to catch up.
const LOG_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a container may take to die after SIGKILL.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// The most output ExecSync returns per stream (as CRI-O); the rest is
/// read and dropped.
pub const MAX_EXEC_OUTPUT: usize = 16 * 1024 * 1024;
/// How long ExecSync waits for the rest of the output after the exit.
const EXEC_OUTPUT_TIMEOUT: Duration = Duration::from_secs(5);
const SIGKILL: u32 = 9;
const SIGTERM: u32 = 15;

/// Errors of container operations.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("container {0} not found")]
    NotFound(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("container name {name} is already reserved by container {id}")]
    NameReserved { name: String, id: String },
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Timeout(String),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error("preparing the root filesystem: {0}")]
    Rootfs(#[from] rootfs::RootfsError),
    #[error(transparent)]
    Volume(#[from] volumes::VolumeError),
    #[error(transparent)]
    Spec(#[from] spec::SpecError),
    #[error("the agent refused: {}", .0.message())]
    Agent(tonic::Status),
    #[error(transparent)]
    Log(#[from] log::LogError),
    #[error("saving container state: {0}")]
    State(#[from] StateError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

/// A lifecycle change, for GetContainerEvents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Created,
    Started,
    Stopped,
    Deleted,
}

#[derive(Debug, Clone)]
pub struct ContainerEvent {
    pub container_id: String,
    pub sandbox_id: String,
    pub kind: EventKind,
    pub at_ns: i64,
}

/// A request to reopen a log file, answered with the outcome.
type ReopenRequest = oneshot::Sender<Result<(), String>>;

/// A container in memory.
#[derive(Debug)]
struct Entry {
    record: Mutex<ContainerRecord>,
    /// Becomes true when the container has exited.
    exited: watch::Sender<bool>,
    /// Asks the log task to reopen the log file.
    reopen: std::sync::Mutex<Option<mpsc::UnboundedSender<ReopenRequest>>>,
}

/// What CreateContainer was asked.
#[derive(Debug, Clone)]
pub struct NewContainer {
    pub sandbox_id: String,
    pub config: ContainerConfig,
    /// The pod's sysctls (from the request's sandbox config).
    pub pod_sysctls: std::collections::BTreeMap<String, String>,
}

/// What a container takes from its pod.
struct PodContext {
    files: spec::SandboxFiles,
    hostname: String,
    sysctls: std::collections::BTreeMap<String, String>,
}

/// Output and exit code of ExecSync.
#[derive(Debug, Default)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit_code: i32,
}

/// All containers of this daemon.
pub struct Containers {
    config: Config,
    sandboxes: Arc<Sandboxes>,
    store: Arc<ImageStore>,
    records: RecordDir,
    all: std::sync::Mutex<HashMap<String, Arc<Entry>>>,
    /// Reserved names → container id.
    names: std::sync::Mutex<HashMap<String, String>>,
    events: broadcast::Sender<ContainerEvent>,
    /// Running containers' output for attach sessions.
    fanout: stream::OutputFanout,
}

/// Linux's limit on a process's supplementary groups.
const NGROUPS_MAX: usize = 65_536;

/// What `request` asks of the agent that older revisions do not know
/// (they would refuse it as unknown, or ignore it): the pod's agent is
/// asked its revision first, and a too old one is an error saying so.
async fn require_revision_for(
    agent: &AgentClient,
    sandbox_id: &str,
    request: &carapace_agent_api::v1::CreateContainerRequest,
) -> Result<(), ContainerError> {
    use carapace_agent_api::v1::NamespaceMode;
    let needs = [
        (
            request.pid_mode == NamespaceMode::Target as i32,
            carapace_agent_api::PID_TARGET_API_VERSION,
            "pid mode TARGET",
        ),
        (
            !request.group.is_empty(),
            carapace_agent_api::GROUP_API_VERSION,
            "a process group the agent resolves",
        ),
        (
            request.strict_supplemental_groups,
            carapace_agent_api::GROUP_API_VERSION,
            "supplemental_groups_policy Strict",
        ),
    ];
    let Some((_, needed, what)) = needs.into_iter().filter(|n| n.0).max_by_key(|n| n.1) else {
        return Ok(());
    };
    crate::sandbox::require_agent_revision(agent, sandbox_id, needed, what).await?;
    Ok(())
}

fn agent_err(status: tonic::Status) -> ContainerError {
    ContainerError::Agent(status)
}

impl Containers {
    /// Opens the store and reloads the recorded containers; the running
    /// ones get their log and exit tasks again. Unreadable records are
    /// logged and skipped.
    pub fn load(
        config: Config,
        sandboxes: Arc<Sandboxes>,
        store: Arc<ImageStore>,
    ) -> Result<Arc<Self>, ContainerError> {
        let records = RecordDir::open(&config.state_dir, "containers")?;
        let loaded = records.load_all_logged::<ContainerRecord>("container");
        let (events, _) = broadcast::channel(1024);
        let this = Arc::new(Self {
            config,
            sandboxes,
            store,
            records,
            all: Default::default(),
            names: Default::default(),
            events,
            fanout: Default::default(),
        });
        let mut running = Vec::new();
        for record in loaded {
            if this.sandboxes.get(&record.sandbox_id).is_none() {
                tracing::warn!(id = %record.id, sandbox = %record.sandbox_id, "container of an unknown pod sandbox; keeping its record for removal");
            }
            let (exited, _) = watch::channel(record.state == ContainerState::Exited);
            if record.state == ContainerState::Running {
                running.push(record.id.clone());
            }
            lock(&this.names).insert(record.reserved_name(), record.id.clone());
            lock(&this.all).insert(
                record.id.clone(),
                Arc::new(Entry {
                    record: Mutex::new(record),
                    exited,
                    reopen: Default::default(),
                }),
            );
        }
        tracing::info!("loaded {} containers", lock(&this.all).len());
        for id in running {
            let this = this.clone();
            tokio::spawn(async move { this.watch_running(&id).await });
        }
        Ok(this)
    }

    fn get(&self, id: &str) -> Option<Arc<Entry>> {
        lock(&self.all).get(id).cloned()
    }

    fn entry(&self, id: &str) -> Result<Arc<Entry>, ContainerError> {
        if id.is_empty() {
            return Err(ContainerError::InvalidArgument(
                "container id is empty".into(),
            ));
        }
        self.get(id)
            .ok_or_else(|| ContainerError::NotFound(id.to_owned()))
    }

    /// Copies of all records.
    pub async fn list(&self) -> Vec<ContainerRecord> {
        let entries: Vec<_> = lock(&self.all).values().cloned().collect();
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            out.push(e.record.lock().await.clone());
        }
        out
    }

    /// A copy of one record.
    pub async fn record(&self, id: &str) -> Result<ContainerRecord, ContainerError> {
        Ok(self.entry(id)?.record.lock().await.clone())
    }

    /// Lifecycle events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<ContainerEvent> {
        self.events.subscribe()
    }

    fn emit(&self, record: &ContainerRecord, kind: EventKind) {
        let _ = self.events.send(ContainerEvent {
            container_id: record.id.clone(),
            sandbox_id: record.sandbox_id.clone(),
            kind,
            at_ns: now_ns(),
        });
    }

    /// The agent of a container's pod (FailedPrecondition when the pod is
    /// not ready).
    async fn agent(&self, sandbox_id: &str) -> Result<AgentClient, ContainerError> {
        let sandbox = self
            .sandboxes
            .get(sandbox_id)
            .ok_or_else(|| SandboxError::NotFound(sandbox_id.to_owned()))?;
        let mut sandbox = sandbox.lock().await;
        Ok(self.sandboxes.agent(&mut sandbox).await?)
    }

    /// CreateContainer: root filesystem, volumes, the container in the
    /// agent, the record. On failure nothing is left behind.
    pub async fn create(&self, new: NewContainer) -> Result<String, ContainerError> {
        let config = &new.config;
        let meta = config.metadata.as_ref().ok_or_else(|| {
            ContainerError::InvalidArgument("container config metadata is required".into())
        })?;
        if meta.name.is_empty() {
            return Err(ContainerError::InvalidArgument(
                "container metadata.name is empty".into(),
            ));
        }
        let image = config
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .unwrap_or_default();
        if image.is_empty() {
            return Err(ContainerError::InvalidArgument(
                "container config image.image is empty".into(),
            ));
        }
        if new.sandbox_id.is_empty() {
            return Err(ContainerError::InvalidArgument(
                "pod sandbox id is empty".into(),
            ));
        }
        let sandbox = self
            .sandboxes
            .get(&new.sandbox_id)
            .ok_or_else(|| SandboxError::NotFound(new.sandbox_id.clone()))?;
        spec::check_mounts(config)?;
        self.check_pid_target(&new.sandbox_id, config).await?;
        let (agent, share_root, log_directory, hostname, files) = {
            let mut sandbox = sandbox.lock().await;
            let agent = self.sandboxes.agent(&mut sandbox).await?;
            (
                agent,
                sandbox.record.share_dir(),
                sandbox.record.log_directory.clone(),
                sandbox.record.hostname.clone(),
                spec::SandboxFiles {
                    hostname: sandbox.record.files.hostname.clone(),
                    resolv_conf: sandbox.record.files.resolv_conf.clone(),
                    hosts: sandbox.record.files.hosts.clone(),
                    shm: sandbox.record.files.shm.clone(),
                },
            )
        };
        let resolved = self.store.resolve(&image).map_err(|e| {
            ContainerError::NotFound(format!(
                "image {image:?} is not present: {e} (pull it first)"
            ))
        })?;

        let name = record::reserved_name(&new.sandbox_id, &meta.name, meta.attempt);
        let id = crate::sandbox::new_id().map_err(|e| ContainerError::Io {
            what: "making a container id".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        {
            let mut names = lock(&self.names);
            if let Some(existing) = names.get(&name) {
                return Err(ContainerError::NameReserved {
                    name,
                    id: existing.clone(),
                });
            }
            names.insert(name.clone(), id.clone());
        }
        let mounts: Vec<MountRecord> = config
            .mounts
            .iter()
            .map(|m| MountRecord {
                container_path: m.container_path.clone(),
                host_path: m.host_path.clone(),
                readonly: m.readonly,
                selinux_relabel: m.selinux_relabel,
                propagation: m.propagation,
            })
            .collect();
        let log_path = (!log_directory.is_empty() && !config.log_path.is_empty())
            .then(|| Path::new(&log_directory).join(&config.log_path));
        let record = ContainerRecord {
            id: id.clone(),
            sandbox_id: new.sandbox_id.clone(),
            name: meta.name.clone(),
            attempt: meta.attempt,
            image: image.clone(),
            image_id: resolved.record.id.to_string(),
            image_ref: resolved
                .record
                .repo_digests
                .first()
                .cloned()
                .unwrap_or_else(|| resolved.record.id.to_string()),
            labels: config.labels.clone().into_iter().collect(),
            annotations: config.annotations.clone().into_iter().collect(),
            log_path,
            tty: config.tty,
            stdin: config.stdin,
            stdin_once: config.stdin_once,
            state: ContainerState::Created,
            created_at_ns: now_ns(),
            started_at_ns: 0,
            finished_at_ns: 0,
            exit_code: 0,
            reason: String::new(),
            message: String::new(),
            mounts,
            layer_dir: self.config.containers_dir.join(&id),
            share_dir: share_root.join(&id),
            process_json: String::new(),
            username: String::new(),
            gid_from_passwd: false,
            group: String::new(),
            strict_supplemental_groups: false,
            user: None,
            stop_signal: parse_signal(&resolved.record.config.stop_signal).unwrap_or(SIGTERM),
        };
        let pod = PodContext {
            files,
            hostname,
            sysctls: new.pod_sysctls.clone(),
        };
        match self
            .create_in_guest(&agent, record, config, &resolved.record.config, &pod)
            .await
        {
            Ok(record) => {
                self.emit(&record, EventKind::Created);
                let (exited, _) = watch::channel(false);
                lock(&self.all).insert(
                    id.clone(),
                    Arc::new(Entry {
                        record: Mutex::new(record),
                        exited,
                        reopen: Default::default(),
                    }),
                );
                Ok(id)
            }
            Err(e) => {
                lock(&self.names).remove(&name);
                Err(e)
            }
        }
    }

    /// With pid mode TARGET, the target must be a container of the same
    /// pod whose process has not ended (kubelet aims ephemeral containers
    /// at running ones).
    async fn check_pid_target(
        &self,
        sandbox_id: &str,
        config: &ContainerConfig,
    ) -> Result<(), ContainerError> {
        let target = spec::pid_target(config);
        if target.is_empty() {
            return Ok(());
        }
        let entry = self.get(target).ok_or_else(|| {
            ContainerError::NotFound(format!("{target} (the pid namespace target)"))
        })?;
        let record = entry.record.lock().await;
        if record.sandbox_id != sandbox_id {
            return Err(ContainerError::InvalidArgument(format!(
                "the pid namespace target {target} is in another pod sandbox"
            )));
        }
        if record.state == ContainerState::Exited {
            return Err(ContainerError::FailedPrecondition(format!(
                "the pid namespace target {target} has exited"
            )));
        }
        Ok(())
    }

    async fn create_in_guest(
        &self,
        agent: &AgentClient,
        mut record: ContainerRecord,
        config: &ContainerConfig,
        image: &crate::image::manifest::ImageConfig,
        pod: &PodContext,
    ) -> Result<ContainerRecord, ContainerError> {
        let rootfs_target = record.share_dir.join("rootfs");
        let began = std::time::Instant::now();
        let prepared = rootfs::prepare(
            &self.store,
            &record.id,
            &record.image_id,
            &record.layer_dir,
            &rootfs_target,
        );
        if let Err(e) = prepared {
            let _ = std::fs::remove_dir_all(&record.share_dir);
            let _ = std::fs::remove_dir_all(&record.layer_dir);
            return Err(e.into());
        }
        let result = async {
            volumes::bind_all(&record.share_dir, &record.mounts)?;
            let guest_dir = format!("{GUEST_SHARE_DIR}/{}", record.id);
            let guest_mounts = record
                .mounts
                .iter()
                .enumerate()
                .map(|(i, m)| spec::GuestMount {
                    container_path: m.container_path.clone(),
                    guest_source: format!("{guest_dir}/mounts/{i}"),
                    readonly: m.readonly,
                    propagation: m.propagation,
                })
                .collect();
            let request = spec::agent_request(&spec::SpecInput {
                container_id: &record.id,
                config,
                image,
                root_path: format!("{guest_dir}/rootfs"),
                mounts: guest_mounts,
                sandbox_files: pod.files.clone(),
                pod_hostname: pod.hostname.clone(),
                pod_sysctls: pod.sysctls.clone(),
            })?;
            require_revision_for(agent, &record.sandbox_id, &request).await?;
            record.gid_from_passwd = request.gid_from_passwd;
            record.process_json = process_of(&request)?;
            record.username = request.username.clone();
            record.group = request.group.clone();
            record.strict_supplemental_groups = request.strict_supplemental_groups;
            let host_ms = began.elapsed().as_millis() as u64;
            let created = agent
                .rpc()
                .create_container(request)
                .await
                .map_err(agent_err)?
                .into_inner();
            // The guest's word: kept only within what Linux allows a
            // process (NGROUPS_MAX supplementary groups).
            record.user = (created.identity_known && created.groups.len() <= NGROUPS_MAX)
                .then_some(ProcessIdentity {
                    uid: created.uid,
                    gid: created.gid,
                    groups: created.groups,
                });
            tracing::debug!(
                id = %record.id,
                host_ms,
                agent_ms = began.elapsed().as_millis() as u64 - host_ms,
                "container created in the guest"
            );
            if let Err(e) = self.records.save(&record.id, &record) {
                let _ = agent
                    .rpc()
                    .delete_container(DeleteContainerRequest {
                        container_id: record.id.clone(),
                        force: true,
                    })
                    .await;
                return Err(e.into());
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                tracing::info!(id = %record.id, sandbox = %record.sandbox_id, name = %record.name, "container created");
                Ok(record)
            }
            Err(e) => {
                self.teardown(&record).await;
                Err(e)
            }
        }
    }

    /// Unbinds the volumes, unmounts the root filesystem and removes the
    /// container's directories. Idempotent.
    async fn teardown(&self, record: &ContainerRecord) {
        volumes::unbind_all(&record.share_dir, record.mounts.len());
        let rootfs_target = record.share_dir.join("rootfs");
        if let Err(e) =
            rootfs::teardown(&self.store, &record.id, &record.layer_dir, &rootfs_target).await
        {
            tracing::error!(id = %record.id, "removing the root filesystem: {e}");
        }
        for dir in [&record.share_dir, &record.layer_dir] {
            if let Err(e) = std::fs::remove_dir_all(dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::error!(id = %record.id, "removing {}: {e}", dir.display());
                }
            }
        }
    }

    /// StartContainer.
    pub async fn start(self: &Arc<Self>, id: &str) -> Result<(), ContainerError> {
        let entry = self.entry(id)?;
        let mut record = entry.record.lock().await;
        if record.state != ContainerState::Created {
            return Err(ContainerError::FailedPrecondition(format!(
                "container {id} is {:?}, not created",
                record.state
            )));
        }
        if let Some(path) = &record.log_path {
            // Opened now so that a bad log path fails the start, not later.
            log::CriLog::open(path)?;
        }
        let agent = self.agent(&record.sandbox_id).await?;
        agent
            .rpc()
            .start_container(StartContainerRequest {
                container_id: id.to_owned(),
            })
            .await
            .map_err(agent_err)?;
        record.state = ContainerState::Running;
        record.started_at_ns = now_ns();
        self.records.save(id, &*record)?;
        self.emit(&record, EventKind::Started);
        tracing::info!(id, "container started");
        drop(record);
        let this = self.clone();
        let id = id.to_owned();
        tokio::spawn(async move { this.watch_running(&id).await });
        Ok(())
    }

    /// Serves a running container until it exits: copies its output into
    /// its log, waits for its exit and records it.
    async fn watch_running(self: Arc<Self>, id: &str) {
        let Some(entry) = self.get(id) else { return };
        let (sandbox_id, log_path) = {
            let r = entry.record.lock().await;
            (r.sandbox_id.clone(), r.log_path.clone())
        };
        let exit = loop {
            let agent = match self.agent(&sandbox_id).await {
                Ok(agent) => agent,
                Err(e) => break vm_gone(&e.to_string()),
            };
            let log_task = log_path.as_ref().map(|path| {
                let (tx, rx) = mpsc::unbounded_channel();
                *lock(&entry.reopen) = Some(tx);
                let fanout = self.fanout.open(id);
                tokio::spawn(copy_output(
                    agent.clone(),
                    id.to_owned(),
                    path.clone(),
                    rx,
                    fanout,
                ))
            });
            let waited = agent
                .rpc()
                .wait_process(WaitProcessRequest {
                    process: Some(ProcessRef {
                        container_id: id.to_owned(),
                        exec_id: String::new(),
                    }),
                })
                .await;
            match waited {
                Ok(reply) => {
                    if let Some(task) = log_task {
                        if tokio::time::timeout(LOG_DRAIN_TIMEOUT, task).await.is_err() {
                            tracing::warn!(id, "output still open after the exit (a process left behind holds it); log may miss its last lines");
                        }
                    }
                    break reply.into_inner().status.unwrap_or_default();
                }
                Err(status) => {
                    if let Some(task) = log_task {
                        task.abort();
                    }
                    if status.code() == tonic::Code::NotFound {
                        break vm_gone("the agent no longer knows the container");
                    }
                    // The connection broke: the VM died, or it was a
                    // transient failure; `agent()` tells which.
                    tracing::warn!(id, "waiting for the container: {}", status.message());
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        };
        *lock(&entry.reopen) = None;
        self.fanout.close(id);
        let mut record = entry.record.lock().await;
        if record.state != ContainerState::Running {
            return;
        }
        record.state = ContainerState::Exited;
        record.exit_code = exit.exit_code;
        // The guest's clock is its own (and drifts under emulation): its
        // exit time is used only when it is plausible on the host's clock.
        let now = now_ns();
        record.finished_at_ns =
            if (record.started_at_ns..=now).contains(&exit.finished_at_unix_nanos) {
                exit.finished_at_unix_nanos
            } else {
                now
            };
        record.reason = exit.reason.clone();
        if exit.signal != 0 {
            record.message = format!("killed by signal {}", exit.signal);
        }
        if let Err(e) = self.records.save(id, &*record) {
            tracing::error!(id, "recording the container's exit: {e}");
        }
        tracing::info!(id, exit_code = exit.exit_code, reason = %exit.reason, "container exited");
        self.emit(&record, EventKind::Stopped);
        entry.exited.send_replace(true);
    }

    /// StopContainer: the stop signal, then SIGKILL after `timeout`.
    /// Stopping a container that is not running is not an error.
    pub async fn stop(&self, id: &str, timeout: Duration) -> Result<(), ContainerError> {
        let Some(entry) = self.get(id) else {
            if id.is_empty() {
                return Err(ContainerError::InvalidArgument(
                    "container id is empty".into(),
                ));
            }
            return Ok(());
        };
        let (sandbox_id, stop_signal) = {
            let r = entry.record.lock().await;
            if r.state != ContainerState::Running {
                return Ok(());
            }
            (r.sandbox_id.clone(), r.stop_signal)
        };
        let agent = match self.agent(&sandbox_id).await {
            Ok(agent) => agent,
            Err(e) => {
                // Nothing runs without the VM: record the exit now.
                self.mark_exited(&entry, vm_gone(&e.to_string())).await;
                return Ok(());
            }
        };
        let mut exited = entry.exited.subscribe();
        let signal = |sig: u32| {
            let agent = agent.clone();
            let id = id.to_owned();
            async move {
                agent
                    .rpc()
                    .signal_process(SignalProcessRequest {
                        process: Some(ProcessRef {
                            container_id: id,
                            exec_id: String::new(),
                        }),
                        signal: sig,
                    })
                    .await
            }
        };
        if !timeout.is_zero() {
            if let Err(e) = signal(stop_signal).await {
                tracing::debug!(id, "stop signal: {}", e.message());
            }
            if tokio::time::timeout(timeout, exited.wait_for(|x| *x))
                .await
                .is_ok()
            {
                return Ok(());
            }
        }
        if let Err(e) = signal(SIGKILL).await {
            tracing::debug!(id, "SIGKILL: {}", e.message());
        }
        let killed = tokio::time::timeout(KILL_TIMEOUT, exited.wait_for(|x| *x))
            .await
            .is_ok();
        if killed {
            Ok(())
        } else {
            Err(ContainerError::Timeout(format!(
                "container {id} did not exit {KILL_TIMEOUT:?} after SIGKILL"
            )))
        }
    }

    async fn mark_exited(&self, entry: &Entry, exit: ExitStatus) {
        let mut record = entry.record.lock().await;
        if record.state == ContainerState::Exited {
            return;
        }
        let was_created = record.state == ContainerState::Created;
        record.state = ContainerState::Exited;
        record.exit_code = exit.exit_code;
        record.reason = exit.reason;
        record.message = "the pod VM is gone".into();
        record.finished_at_ns = now_ns();
        if was_created {
            record.started_at_ns = 0;
        }
        if let Err(e) = self.records.save(&record.id, &*record) {
            tracing::error!(id = %record.id, "recording the container's exit: {e}");
        }
        self.emit(&record, EventKind::Stopped);
        entry.exited.send_replace(true);
    }

    /// RemoveContainer: kills it if it runs, deletes it in the agent,
    /// removes its filesystems and record. Removing an unknown container is
    /// not an error.
    pub async fn remove(&self, id: &str) -> Result<(), ContainerError> {
        let Some(entry) = self.get(id) else {
            if id.is_empty() {
                return Err(ContainerError::InvalidArgument(
                    "container id is empty".into(),
                ));
            }
            return Ok(());
        };
        self.stop(id, Duration::ZERO).await?;
        let record = entry.record.lock().await.clone();
        if let Ok(agent) = self.agent(&record.sandbox_id).await {
            let deleted = agent
                .rpc()
                .delete_container(DeleteContainerRequest {
                    container_id: id.to_owned(),
                    force: true,
                })
                .await;
            match deleted {
                Ok(_) => {}
                Err(s) if s.code() == tonic::Code::NotFound => {}
                Err(s) => return Err(agent_err(s)),
            }
        }
        self.teardown(&record).await;
        self.records.remove(id)?;
        lock(&self.names).remove(&record.reserved_name());
        lock(&self.all).remove(id);
        self.emit(&record, EventKind::Deleted);
        tracing::info!(id, "container removed");
        Ok(())
    }

    /// The ids of the containers of a pod.
    pub async fn of_sandbox(&self, sandbox_id: &str) -> Vec<String> {
        self.list()
            .await
            .into_iter()
            .filter(|r| r.sandbox_id == sandbox_id)
            .map(|r| r.id)
            .collect()
    }

    /// Kills the pod's running containers (StopPodSandbox).
    pub async fn stop_sandbox(&self, sandbox_id: &str) -> Result<(), ContainerError> {
        for id in self.of_sandbox(sandbox_id).await {
            self.stop(&id, Duration::ZERO).await?;
        }
        Ok(())
    }

    /// Removes the pod's containers (RemovePodSandbox).
    pub async fn remove_sandbox(&self, sandbox_id: &str) -> Result<(), ContainerError> {
        for id in self.of_sandbox(sandbox_id).await {
            self.remove(&id).await?;
        }
        Ok(())
    }

    /// ExecSync: runs `cmd` in the container, collects its output, and
    /// kills it when `timeout` (if not zero) passes.
    pub async fn exec_sync(
        &self,
        id: &str,
        cmd: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, ContainerError> {
        let handle = self
            .start_exec(
                id,
                &stream::ExecSpec {
                    cmd: cmd.to_vec(),
                    tty: false,
                    stdin: false,
                },
            )
            .await?;
        let (agent, process_ref) = (handle.agent, handle.process);
        let output = tokio::spawn(collect_output(agent.clone(), process_ref.clone()));
        let mut waiter = agent.rpc();
        let wait = waiter.wait_process(WaitProcessRequest {
            process: Some(process_ref.clone()),
        });
        let waited = if timeout.is_zero() {
            Ok(wait.await)
        } else {
            tokio::time::timeout(timeout, wait).await
        };
        let status = match waited {
            Ok(result) => result.map_err(agent_err)?.into_inner().status,
            Err(_) => {
                let _ = agent
                    .rpc()
                    .signal_process(SignalProcessRequest {
                        process: Some(process_ref.clone()),
                        signal: SIGKILL,
                    })
                    .await;
                // Collect the status so the agent forgets the exec.
                let _ = agent
                    .rpc()
                    .wait_process(WaitProcessRequest {
                        process: Some(process_ref),
                    })
                    .await;
                output.abort();
                return Err(ContainerError::Timeout(format!(
                    "command {cmd:?} timed out after {timeout:?}"
                )));
            }
        };
        let (stdout, stderr) = match tokio::time::timeout(EXEC_OUTPUT_TIMEOUT, output).await {
            Ok(Ok(out)) => out,
            _ => {
                tracing::warn!(id, "exec output still open after its exit");
                Default::default()
            }
        };
        Ok(ExecOutput {
            stdout,
            stderr,
            exit_code: status.map(|s| s.exit_code).unwrap_or(-1),
        })
    }

    /// ContainerStats from the agent.
    pub async fn stats(&self, id: &str) -> Result<ContainerStatsResponse, ContainerError> {
        let entry = self.entry(id)?;
        let sandbox_id = entry.record.lock().await.sandbox_id.clone();
        let agent = self.agent(&sandbox_id).await?;
        Ok(agent
            .rpc()
            .container_stats(ContainerStatsRequest {
                container_id: id.to_owned(),
            })
            .await
            .map_err(agent_err)?
            .into_inner())
    }

    /// UpdateContainerResources: `oci_resources_json` is an OCI
    /// `linux.resources` object.
    pub async fn update_resources(
        &self,
        id: &str,
        oci_resources_json: String,
    ) -> Result<(), ContainerError> {
        let entry = self.entry(id)?;
        let sandbox_id = {
            let r = entry.record.lock().await;
            if r.state == ContainerState::Exited {
                return Err(ContainerError::FailedPrecondition(format!(
                    "container {id} has exited"
                )));
            }
            r.sandbox_id.clone()
        };
        let agent = self.agent(&sandbox_id).await?;
        agent
            .rpc()
            .update_container_resources(UpdateContainerResourcesRequest {
                container_id: id.to_owned(),
                oci_resources_json,
            })
            .await
            .map_err(agent_err)?;
        Ok(())
    }

    /// ReopenContainerLog: the running container's log file is reopened
    /// (kubelet rotated it).
    pub async fn reopen_log(&self, id: &str) -> Result<(), ContainerError> {
        let entry = self.entry(id)?;
        if entry.record.lock().await.state != ContainerState::Running {
            return Err(ContainerError::FailedPrecondition(format!(
                "container {id} is not running"
            )));
        }
        let tx = lock(&entry.reopen).clone().ok_or_else(|| {
            ContainerError::FailedPrecondition(format!("container {id} has no log"))
        })?;
        let (done, result) = oneshot::channel();
        tx.send(done).map_err(|_| {
            ContainerError::FailedPrecondition(format!("container {id} is not running"))
        })?;
        match result.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ContainerError::Io {
                what: "reopening the log".into(),
                source: std::io::Error::other(e),
            }),
            Err(_) => Err(ContainerError::FailedPrecondition(format!(
                "container {id} is not running"
            ))),
        }
    }
}

/// The exit recorded when the VM went away under a running container.
fn vm_gone(why: &str) -> ExitStatus {
    tracing::warn!("container ended with its pod VM: {why}");
    ExitStatus {
        exit_code: 255,
        signal: 0,
        reason: "Error".into(),
        finished_at_unix_nanos: 0,
    }
}

/// The `process` object of the spec in `request`, as JSON.
fn process_of(request: &CreateContainerRequest) -> Result<String, ContainerError> {
    let spec: serde_json::Value =
        serde_json::from_str(&request.oci_spec_json).map_err(|e| ContainerError::Io {
            what: "reading the built spec".into(),
            source: e.into(),
        })?;
    Ok(spec.get("process").cloned().unwrap_or_default().to_string())
}

/// Copies a container's output into its CRI log until the output ends;
/// reopens the file when asked. Every chunk also goes to `fanout`, for
/// attach sessions (which may lose chunks; the log never does).
async fn copy_output(
    agent: AgentClient,
    id: String,
    path: PathBuf,
    mut reopen: mpsc::UnboundedReceiver<ReopenRequest>,
    fanout: broadcast::Sender<carapace_agent_api::v1::OutputChunk>,
) {
    let mut log = match log::CriLog::open(&path) {
        Ok(log) => log,
        Err(e) => {
            tracing::error!(id, "{e}");
            return;
        }
    };
    let stream = agent
        .rpc()
        .read_output(ReadOutputRequest {
            process: Some(ProcessRef {
                container_id: id.clone(),
                exec_id: String::new(),
            }),
        })
        .await;
    let mut stream = match stream {
        Ok(s) => s.into_inner(),
        Err(e) => {
            tracing::error!(id, "reading the container's output: {}", e.message());
            return;
        }
    };
    loop {
        tokio::select! {
            chunk = stream.message() => match chunk {
                Ok(Some(chunk)) => {
                    let which = if chunk.stream == OutputStream::Stderr as i32 {
                        log::Stream::Stderr
                    } else {
                        log::Stream::Stdout
                    };
                    if let Err(e) = log.write(which, &chunk.data, SystemTime::now()) {
                        tracing::error!(id, "{e}");
                    }
                    let _ = fanout.send(chunk);
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(id, "container output: {}", e.message());
                    break;
                }
            },
            Some(done) = reopen.recv() => {
                let _ = done.send(log.reopen().map_err(|e| e.to_string()));
            }
        }
    }
    if let Err(e) = log.finish(SystemTime::now()) {
        tracing::error!(id, "{e}");
    }
}

/// Reads an exec's output to the end, keeping up to [`MAX_EXEC_OUTPUT`]
/// bytes of each stream.
async fn collect_output(agent: AgentClient, process: ProcessRef) -> (Vec<u8>, Vec<u8>) {
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let Ok(stream) = agent
        .rpc()
        .read_output(ReadOutputRequest {
            process: Some(process),
        })
        .await
    else {
        return (stdout, stderr);
    };
    let mut stream = stream.into_inner();
    while let Ok(Some(chunk)) = stream.message().await {
        let buf = if chunk.stream == OutputStream::Stderr as i32 {
            &mut stderr
        } else {
            &mut stdout
        };
        let room = MAX_EXEC_OUTPUT.saturating_sub(buf.len());
        buf.extend_from_slice(&chunk.data[..chunk.data.len().min(room)]);
    }
    (stdout, stderr)
}

/// A signal name or number (`SIGTERM`, `TERM`, `15`) as a number.
pub fn parse_signal(s: &str) -> Option<u32> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    if let Ok(n) = s.parse::<u32>() {
        return (1..=64).contains(&n).then_some(n);
    }
    let name = s.to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    let n = match name {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "KILL" => 9,
        "USR1" => 10,
        "USR2" => 12,
        "TERM" => 15,
        "STOP" => 19,
        "WINCH" => 28,
        "PWR" => 30,
        _ => return None,
    };
    Some(n)
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_parse_by_name_and_number() {
        assert_eq!(parse_signal("SIGTERM"), Some(15));
        assert_eq!(parse_signal("quit"), Some(3));
        assert_eq!(parse_signal("SIGWINCH"), Some(28));
        assert_eq!(parse_signal("9"), Some(9));
        assert_eq!(parse_signal(""), None);
        assert_eq!(parse_signal("0"), None);
        assert_eq!(parse_signal("SIGBOGUS"), None);
    }
}
