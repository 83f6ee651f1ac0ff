//! Pod sandboxes: one VM per pod, its lifecycle, and its on-disk record.
//!
//! Operations on one sandbox are serialised by its own lock; operations on
//! different sandboxes run concurrently. Every state change is written to
//! disk before it is reported, so a restarted daemon sees what kubelet saw.

mod pool;
mod record;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use record::{PodMeta, SandboxFiles, SandboxRecord, SandboxState, VmSize};
use tokio::sync::Mutex;

use crate::agent_client::AgentClient;
use crate::config::Config;
use crate::host_cgroup;
use crate::network::tap::{self, VmNetwork};
use crate::network::{Network, NetworkError, PodIdentity, PodNetwork};
use crate::state::{RecordDir, StateError};
use crate::vm::{StartedVm, VmDriver, VmError, VmSpec};
use pool::{WarmPool, WarmVm};

/// Errors of sandbox operations.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("pod sandbox {0} not found")]
    NotFound(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("pod sandbox name {name} is already reserved by sandbox {id}")]
    NameReserved { name: String, id: String },
    #[error("starting the pod VM: {0}")]
    Vm(#[from] VmError),
    #[error("the pod VM's agent did not answer: {reason}; guest console tail:\n{console}")]
    AgentNotReady { reason: String, console: String },
    #[error("pod sandbox {id} is not ready: {reason}")]
    NotReady { id: String, reason: String },
    #[error("the agent of pod sandbox {id} speaks API revision {version}; {what} needs {needed} (a newer guest image)")]
    AgentTooOld {
        id: String,
        what: &'static str,
        version: u32,
        needed: u32,
    },
    #[error("pod network: {0}")]
    Network(#[from] crate::network::NetworkError),
    #[error("saving pod state: {0}")]
    State(#[from] StateError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

/// A sandbox in memory: its record and its agent connection.
#[derive(Debug)]
pub struct Sandbox {
    pub record: SandboxRecord,
    agent: Option<AgentClient>,
}

/// Requested properties of a new sandbox.
#[derive(Debug, Clone)]
pub struct NewSandbox {
    pub meta: PodMeta,
    pub labels: std::collections::BTreeMap<String, String>,
    pub annotations: std::collections::BTreeMap<String, String>,
    pub runtime_handler: String,
    pub log_directory: String,
    pub hostname: String,
    /// The pod's /etc/resolv.conf (from the CRI DNSConfig); empty for none.
    pub resolv_conf: String,
    /// Pod-level sysctls.
    pub sysctls: std::collections::BTreeMap<String, String>,
    /// kubelet's cgroup for the pod (`linux.cgroup_parent`); empty for none.
    pub cgroup_parent: String,
    pub size: VmSize,
    /// CNI capability arguments (`portMappings`, `dns`).
    pub cni_capability_args: std::collections::BTreeMap<String, serde_json::Value>,
}

/// All sandboxes of this daemon.
pub struct Sandboxes {
    config: Config,
    driver: VmDriver,
    network: Network,
    records: RecordDir,
    all: std::sync::Mutex<HashMap<String, Arc<Mutex<Sandbox>>>>,
    /// Reserved names → sandbox id (includes sandboxes being created).
    names: std::sync::Mutex<HashMap<String, String>>,
    /// Booted VMs for the next pods of the default size (`vm.warm_pool`).
    pool: Arc<WarmPool>,
}

/// Asks the agent of sandbox `id` its API revision: one older than
/// `needed` is an error saying that `what` needs a newer guest image.
pub async fn require_agent_revision(
    agent: &AgentClient,
    id: &str,
    needed: u32,
    what: &'static str,
) -> Result<(), SandboxError> {
    let health = agent
        .clone()
        .health()
        .await
        .map_err(|e| SandboxError::NotReady {
            id: id.to_owned(),
            reason: format!("cannot reach the agent: {e}"),
        })?;
    if health.api_version < needed {
        return Err(SandboxError::AgentTooOld {
            id: id.to_owned(),
            what,
            version: health.api_version,
            needed,
        });
    }
    Ok(())
}

impl Sandboxes {
    /// Opens the store and reloads the recorded sandboxes. A sandbox whose
    /// VM is gone is marked not ready with the reason; unreadable records
    /// are logged and skipped.
    pub fn load(config: Config, driver: VmDriver) -> Result<Self, SandboxError> {
        let records = RecordDir::open(&config.state_dir, "sandboxes")?;
        let loaded = records.load_all_logged::<SandboxRecord>("sandbox");
        let mut all = HashMap::new();
        let mut names = HashMap::new();
        for mut record in loaded {
            if record.state == SandboxState::Ready
                && !record.vm.as_ref().is_some_and(|vm| vm.is_running())
            {
                tracing::warn!(id = %record.id, "pod VM exited while the daemon was down");
                record.state = SandboxState::NotReady;
                record.reason = Some("the pod VM exited while the daemon was down".into());
                records.save(&record.id, &record)?;
            }
            names.insert(record.meta.reserved_name(), record.id.clone());
            let id = record.id.clone();
            all.insert(
                id,
                Arc::new(Mutex::new(Sandbox {
                    record,
                    agent: None,
                })),
            );
        }
        tracing::info!("loaded {} pod sandboxes", all.len());
        let network = Network::new(config.network.clone());
        let ids = all.keys().cloned().collect();
        let pool = WarmPool::open(&config, driver.clone(), network.clone(), &ids)?;
        Ok(Self {
            network,
            pool: Arc::new(pool),
            config,
            driver,
            records,
            all: std::sync::Mutex::new(all),
            names: std::sync::Mutex::new(names),
        })
    }

    /// Starts booting the warm pool's VMs (`vm.warm_pool`; none when 0).
    pub fn start_warm_pool(&self) {
        self.pool.fill();
    }

    /// Stops the warm pool's VMs (pods' VMs keep running).
    pub async fn shutdown(&self) {
        self.pool.shutdown().await;
    }

    /// What keeps this host from running pod VMs (empty when nothing).
    pub fn runtime_problems(&self) -> Vec<String> {
        let vm = &self.config.vm;
        [("guest kernel", &vm.kernel), ("guest initrd", &vm.initrd)]
            .into_iter()
            .filter(|(_, path)| !path.is_file())
            .map(|(what, path)| format!("{what} {} is missing", path.display()))
            .collect()
    }

    /// Whether pods can get a network now: `Err` says why not.
    pub fn network_status(&self) -> Result<(), NetworkError> {
        self.network.conf().map(|_| ())
    }

    /// The daemon's configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The VM driver in use.
    pub fn driver(&self) -> &VmDriver {
        &self.driver
    }

    /// The sandbox `id`, if known.
    pub fn get(&self, id: &str) -> Option<Arc<Mutex<Sandbox>>> {
        self.all
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// All sandboxes.
    pub fn list(&self) -> Vec<Arc<Mutex<Sandbox>>> {
        self.all
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Creates a sandbox: reserves its name, boots its VM (or takes a warm
    /// one), waits for the agent, records it. On failure nothing is left
    /// behind.
    pub async fn run(&self, new: NewSandbox) -> Result<String, SandboxError> {
        let id = new_id()?;
        let name = new.meta.reserved_name();
        {
            let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(existing) = names.get(&name) {
                return Err(SandboxError::NameReserved {
                    name,
                    id: existing.clone(),
                });
            }
            names.insert(name.clone(), id.clone());
        }
        let release_name = || {
            self.names
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&name);
        };
        let with_network = match self.wants_network() {
            Ok(with_network) => with_network,
            Err(e) => {
                release_name();
                return Err(e);
            }
        };
        let (id, result) = match self.pool.take(new.size, with_network).await {
            Some(warm) => {
                let id = warm.id.clone();
                self.names
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(name.clone(), id.clone());
                tracing::info!(id, "pod sandbox gets a warm VM");
                (id, self.adopt(warm, new).await)
            }
            None => {
                let result = self.boot(&id, new, with_network).await;
                (id, result)
            }
        };
        match result {
            Ok(sandbox) => {
                self.all
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id.clone(), Arc::new(Mutex::new(sandbox)));
                Ok(id)
            }
            Err(e) => {
                release_name();
                Err(e)
            }
        }
    }

    /// Whether a new pod gets a network: yes with a CNI configuration; no
    /// without one if the network is not required; an error otherwise.
    fn wants_network(&self) -> Result<bool, SandboxError> {
        match self.network.conf() {
            Ok(_) => Ok(true),
            Err(NetworkError::NoConfig(why)) if !self.config.network.required => {
                tracing::info!("pod without a network: {why}");
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn pod_identity(id: &str, new: &NewSandbox) -> PodIdentity {
        PodIdentity {
            sandbox_id: id.to_owned(),
            name: new.meta.name.clone(),
            namespace: new.meta.namespace.clone(),
            uid: new.meta.uid.clone(),
        }
    }

    /// Sets up the pod's network (when it gets one), then boots its VM on
    /// it; on failure the network is torn down again.
    async fn boot(
        &self,
        id: &str,
        new: NewSandbox,
        with_network: bool,
    ) -> Result<Sandbox, SandboxError> {
        let network = if with_network {
            let pod = Self::pod_identity(id, &new);
            let net = self
                .network
                .setup(&pod, new.cni_capability_args.clone())
                .await?;
            match self.connect_tap(&net, false).await {
                Ok(vm_net) => Some((net, vm_net)),
                Err(e) => {
                    self.teardown_network(&net).await;
                    return Err(e.into());
                }
            }
        } else {
            None
        };
        let (pod_net, vm_net) = match network {
            Some((p, v)) => (Some(p), Some(v)),
            None => (None, None),
        };
        let guest_net = match (&pod_net, &vm_net) {
            (Some(p), Some(v)) => crate::network::guest::describe(&p.result, v),
            _ => Default::default(),
        };
        let result = match self.boot_vm(id, &new, vm_net).await {
            Ok(launched) => {
                self.finish(id, new, launched, pod_net.clone(), guest_net)
                    .await
            }
            Err(e) => Err(e),
        };
        if let (Err(_), Some(net)) = (&result, &pod_net) {
            self.teardown_network(net).await;
        }
        result
    }

    /// Makes the pod's tap in its namespace (unless a warm VM's is there
    /// already) and joins it to eth0.
    async fn connect_tap(
        &self,
        net: &PodNetwork,
        tap_exists: bool,
    ) -> Result<VmNetwork, NetworkError> {
        let netns = net.netns.clone();
        let connected = tokio::task::spawn_blocking(move || {
            if tap_exists {
                tap::connect(&netns)
            } else {
                tap::setup(&netns)
            }
        })
        .await;
        connected.unwrap_or_else(|_| {
            Err(NetworkError::Command {
                what: "setting up the tap".into(),
                message: "task failed".into(),
            })
        })
    }

    /// Gives a warm VM to the pod: CNI ADD in the VM's namespace, its tap
    /// joined to eth0, then as a booted VM. On failure the VM is removed
    /// (never returned to the pool: it may have half a pod in it).
    async fn adopt(&self, warm: WarmVm, new: NewSandbox) -> Result<Sandbox, SandboxError> {
        let id = warm.id.clone();
        let mut pod_net = None;
        let mut guest_net = Default::default();
        if let Some(warm_net) = &warm.network {
            let pod = Self::pod_identity(&id, &new);
            let net = match self
                .network
                .setup_in_existing(&pod, new.cni_capability_args.clone())
                .await
            {
                Ok(net) => net,
                Err(e) => {
                    self.pool.discard(warm).await;
                    return Err(e.into());
                }
            };
            match self.connect_tap(&net, true).await {
                Ok(vm_net) => {
                    let mut guest = crate::network::guest::describe(&net.result, &vm_net);
                    for interface in &mut guest.interfaces {
                        interface.device_mac = warm_net.mac.clone();
                    }
                    guest_net = guest;
                    pod_net = Some(net);
                }
                Err(e) => {
                    self.teardown_network(&net).await;
                    self.pool.discard(warm).await;
                    return Err(e.into());
                }
            }
        }
        let WarmVm {
            vm, agent, run_dir, ..
        } = warm;
        let cgroup = match self.create_cgroup(id.as_str(), &new) {
            Ok(cgroup) => cgroup,
            Err(e) => {
                if let Some(net) = &pod_net {
                    self.teardown_network(net).await;
                }
                vm.stop().await;
                let _ = std::fs::remove_dir_all(&run_dir);
                self.pool.forget(&id);
                return Err(e);
            }
        };
        let launched = Launched {
            vm,
            agent,
            run_dir,
            cgroup,
        };
        let result = match place(&launched.vm, launched.cgroup.as_deref()) {
            Ok(()) => {
                self.finish(&id, new, launched, pod_net.clone(), guest_net)
                    .await
            }
            Err(e) => {
                launched.abandon().await;
                Err(e)
            }
        };
        if let (Err(_), Some(net)) = (&result, &pod_net) {
            self.teardown_network(net).await;
        }
        // Saved as a sandbox, or stopped and removed: no longer the pool's.
        self.pool.forget(&id);
        result
    }

    /// Best-effort teardown on a failed start (logged).
    async fn teardown_network(&self, net: &PodNetwork) {
        if let Err(e) = self.release_network(net).await {
            tracing::warn!("tearing down the network of a pod that failed to start: {e}");
        }
    }

    /// Removes the tap and tc rules, runs CNI DEL, removes the namespace.
    async fn release_network(&self, net: &PodNetwork) -> Result<(), NetworkError> {
        let netns = net.netns.clone();
        let _ = tokio::task::spawn_blocking(move || tap::teardown(&netns)).await;
        self.network.teardown(net).await
    }

    /// kubelet's pod cgroup for the sandbox's VM processes, created; `None`
    /// when the host has no cgroup v2 hierarchy to put them in.
    fn create_cgroup(&self, id: &str, new: &NewSandbox) -> Result<Option<PathBuf>, SandboxError> {
        host_cgroup::create(&self.config.cgroup_root, &new.cgroup_parent, id)
            .map_err(|e| SandboxError::InvalidArgument(e.to_string()))
    }

    /// Boots the sandbox's VM on `vm_net` in its own run directory and
    /// cgroup, and waits for its agent. On failure nothing of it is left.
    async fn boot_vm(
        &self,
        id: &str,
        new: &NewSandbox,
        vm_net: Option<VmNetwork>,
    ) -> Result<Launched, SandboxError> {
        // Unix socket paths are limited to 108 bytes, so the VM's directory
        // is named by a prefix of the id (ids are random: it is unique).
        let run_dir = self.config.run_dir.join(&id[..RUN_DIR_NAME_LEN]);
        let share_dir = run_dir.join("shared");
        std::fs::create_dir_all(&share_dir).map_err(|source| SandboxError::Io {
            what: format!("creating {}", share_dir.display()),
            source,
        })?;
        let spec = VmSpec {
            kernel: self.config.vm.kernel.clone(),
            initrd: self.config.vm.initrd.clone(),
            vcpus: new.size.vcpus,
            mem_mib: new.size.mem_mib,
            extra_cmdline: String::new(),
            run_dir: run_dir.clone(),
            shared_dir: Some(share_dir),
            network: vm_net,
        };
        let cgroup = match self.create_cgroup(id, new) {
            Ok(cgroup) => cgroup,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&run_dir);
                return Err(e);
            }
        };
        let cleanup = || {
            let _ = std::fs::remove_dir_all(&run_dir);
            if let Some(cg) = &cgroup {
                host_cgroup::remove(cg);
            }
        };
        let vm = match self.driver.start(&spec).await {
            Ok(vm) => vm,
            Err(e) => {
                cleanup();
                return Err(e.into());
            }
        };
        if let Err(e) = place(&vm, cgroup.as_deref()) {
            vm.stop().await;
            cleanup();
            return Err(e);
        }
        let timeout = Duration::from_secs(self.config.vm.boot_timeout_secs);
        match vm.wait_agent(timeout).await {
            Ok((agent, health)) => {
                tracing::info!(
                    id,
                    agent = %health.agent_version,
                    boot_ms = vm.started_at().elapsed().as_millis() as u64,
                    "pod VM ready"
                );
                Ok(Launched {
                    vm,
                    agent,
                    run_dir,
                    cgroup,
                })
            }
            Err(e) => {
                let console = console_tail(vm.console_log(), 20);
                vm.stop().await;
                cleanup();
                Err(SandboxError::AgentNotReady {
                    reason: e.to_string(),
                    console,
                })
            }
        }
    }

    /// Sets the pod up in its VM and records the sandbox; on failure the VM
    /// is stopped and its run directory and cgroup removed.
    async fn finish(
        &self,
        id: &str,
        new: NewSandbox,
        launched: Launched,
        pod_net: Option<PodNetwork>,
        guest_net: crate::network::guest::GuestNetwork,
    ) -> Result<Sandbox, SandboxError> {
        let setup_started = std::time::Instant::now();
        let files = match setup_guest(&launched.agent, &new, guest_net).await {
            Ok(files) => {
                tracing::debug!(
                    id,
                    setup_ms = setup_started.elapsed().as_millis() as u64,
                    "guest set up"
                );
                files
            }
            Err(reason) => {
                launched.abandon().await;
                return Err(SandboxError::InvalidArgument(reason));
            }
        };
        let record = SandboxRecord {
            id: id.to_owned(),
            meta: new.meta,
            labels: new.labels,
            annotations: new.annotations,
            runtime_handler: new.runtime_handler,
            log_directory: new.log_directory,
            hostname: new.hostname,
            created_at_ns: now_ns(),
            state: SandboxState::Ready,
            reason: None,
            size: new.size,
            run_dir: launched.run_dir.clone(),
            vm: Some(launched.vm.handle.clone()),
            files,
            cgroup: launched.cgroup.clone(),
            network: pod_net,
        };
        if let Err(e) = self.records.save(id, &record) {
            launched.abandon().await;
            return Err(e.into());
        }
        Ok(Sandbox {
            record,
            agent: Some(launched.agent),
        })
    }

    /// Stops the sandbox's VM; stopping an unknown or stopped sandbox is
    /// not an error.
    pub async fn stop(&self, id: &str) -> Result<(), SandboxError> {
        let Some(sandbox) = self.get(id) else {
            return Ok(());
        };
        let mut sandbox = sandbox.lock().await;
        if let Some(vm) = sandbox.record.vm.take() {
            vm.stop().await;
        }
        sandbox.agent = None;
        if let Some(net) = sandbox.record.network.clone() {
            // Kept in the record until DEL succeeded, so that a failed
            // teardown is retried by the next stop (kubelet retries).
            let released = self.release_network(&net).await;
            if released.is_ok() {
                sandbox.record.network = None;
            }
            if let Err(e) = released {
                if sandbox.record.state == SandboxState::Ready {
                    sandbox.record.state = SandboxState::NotReady;
                    sandbox.record.reason = Some("stopped".into());
                }
                self.records.save(id, &sandbox.record)?;
                return Err(e.into());
            }
        }
        if sandbox.record.state == SandboxState::Ready {
            sandbox.record.state = SandboxState::NotReady;
            sandbox.record.reason = Some("stopped".into());
        }
        self.records.save(id, &sandbox.record)?;
        Ok(())
    }

    /// Removes the sandbox (stopping it first); removing an unknown
    /// sandbox is not an error.
    pub async fn remove(&self, id: &str) -> Result<(), SandboxError> {
        let Some(sandbox) = self.get(id) else {
            return Ok(());
        };
        self.stop(id).await?;
        let sandbox = sandbox.lock().await;
        if let Some(cg) = &sandbox.record.cgroup {
            host_cgroup::remove(cg);
        }
        unmount_under(&sandbox.record.run_dir);
        if let Err(e) = std::fs::remove_dir_all(&sandbox.record.run_dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(SandboxError::Io {
                    what: format!("removing {}", sandbox.record.run_dir.display()),
                    source: e,
                });
            }
        }
        self.records.remove(id)?;
        self.names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&sandbox.record.meta.reserved_name());
        self.all
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        Ok(())
    }

    /// Re-checks a ready sandbox's VM: if it died, the sandbox becomes not
    /// ready with the reason, and the change is recorded.
    pub fn refresh(&self, sandbox: &mut Sandbox) {
        if sandbox.record.state != SandboxState::Ready {
            return;
        }
        let alive = sandbox.record.vm.as_ref().is_some_and(|vm| vm.is_running());
        if !alive {
            tracing::warn!(id = %sandbox.record.id, "pod VM exited unexpectedly");
            if let Some(vm) = sandbox.record.vm.take() {
                vm.kill_now();
            }
            sandbox.agent = None;
            sandbox.record.state = SandboxState::NotReady;
            sandbox.record.reason = Some("the pod VM exited unexpectedly".into());
            if let Err(e) = self.records.save(&sandbox.record.id, &sandbox.record) {
                tracing::error!("recording the exit of pod VM {}: {e}", sandbox.record.id);
            }
        }
    }

    /// The agent client of a ready sandbox, connecting lazily (e.g. after a
    /// daemon restart).
    pub async fn agent(&self, sandbox: &mut Sandbox) -> Result<AgentClient, SandboxError> {
        self.refresh(sandbox);
        if sandbox.record.state != SandboxState::Ready {
            return Err(SandboxError::NotReady {
                id: sandbox.record.id.clone(),
                reason: sandbox.record.reason.clone().unwrap_or_default(),
            });
        }
        if let Some(agent) = &sandbox.agent {
            return Ok(agent.clone());
        }
        let socket = sandbox
            .record
            .vm
            .as_ref()
            .map(|vm| vm.vsock_socket.clone())
            .unwrap_or_default();
        let agent = AgentClient::connect(&socket)
            .await
            .map_err(|e| SandboxError::NotReady {
                id: sandbox.record.id.clone(),
                reason: format!("cannot reach the agent: {e}"),
            })?;
        sandbox.agent = Some(agent.clone());
        Ok(agent)
    }

    /// The hybrid-vsock socket of the ready sandbox `id`, once its agent
    /// said it serves port-forward (asked each time: the agent may have been
    /// replaced by a VM restart with another guest image).
    pub async fn port_forward_socket(&self, id: &str) -> Result<PathBuf, SandboxError> {
        let sandbox = self
            .get(id)
            .ok_or_else(|| SandboxError::NotFound(id.to_owned()))?;
        let mut sandbox = sandbox.lock().await;
        let agent = self.agent(&mut sandbox).await?;
        require_agent_revision(
            &agent,
            id,
            carapace_agent_api::PORT_FORWARD_API_VERSION,
            "port-forward",
        )
        .await?;
        Ok(sandbox
            .record
            .vm
            .as_ref()
            .map(|vm| vm.vsock_socket.clone())
            .unwrap_or_default())
    }

    /// The directory holding this daemon's VM run directories.
    pub fn run_root(&self) -> PathBuf {
        self.config.run_dir.clone()
    }
}

/// The VM of a sandbox being created, until its record is saved.
struct Launched {
    vm: StartedVm,
    agent: AgentClient,
    run_dir: PathBuf,
    cgroup: Option<PathBuf>,
}

impl Launched {
    /// Stops the VM and removes its run directory and cgroup.
    async fn abandon(self) {
        self.vm.stop().await;
        let _ = std::fs::remove_dir_all(&self.run_dir);
        if let Some(cg) = &self.cgroup {
            host_cgroup::remove(cg);
        }
    }
}

/// Moves the VM's processes into the sandbox's cgroup, if it has one.
fn place(vm: &StartedVm, cgroup: Option<&Path>) -> Result<(), SandboxError> {
    let Some(cg) = cgroup else {
        return Ok(());
    };
    // A jailed VMM runs as the child of the monitor process on record.
    let mut pids = vm.handle.pids();
    pids.extend(vm.handle.monitor.children());
    pids.into_iter()
        .try_for_each(|pid| host_cgroup::add(cg, pid))
        .map_err(|e| SandboxError::Io {
            what: "placing the pod VM in its cgroup".into(),
            source: std::io::Error::other(e.to_string()),
        })
}

/// Length of the id prefix naming a VM's run directory.
pub const RUN_DIR_NAME_LEN: usize = 16;

/// Sets up the pod in the guest: hostname, DNS, the virtio-fs share,
/// sysctls. The error is the agent's message (it validates the request).
async fn setup_guest(
    agent: &AgentClient,
    new: &NewSandbox,
    net: crate::network::guest::GuestNetwork,
) -> Result<SandboxFiles, String> {
    use carapace_agent_api::v1::{SetupSandboxRequest, SharedFilesystem};
    let reply = agent
        .rpc()
        .setup_sandbox(SetupSandboxRequest {
            hostname: new.hostname.clone(),
            resolv_conf: new.resolv_conf.clone(),
            hosts: String::new(),
            shared_filesystems: vec![SharedFilesystem {
                tag: crate::vm::SHARED_FS_TAG.into(),
                mount_point: crate::container::GUEST_SHARE_DIR.into(),
            }],
            sysctls: new.sysctls.clone().into_iter().collect(),
            interfaces: net.interfaces,
            routes: net.routes,
        })
        .await
        .map_err(|s| format!("setting up the pod in its VM: {}", s.message()))?
        .into_inner();
    Ok(SandboxFiles {
        hostname: reply.hostname_path,
        resolv_conf: reply.resolv_conf_path,
        hosts: reply.hosts_path,
        shm: reply.shm_path,
    })
}

/// Unmounts whatever is still mounted under `dir` (deepest first), so that
/// removing `dir` can never reach into a volume or an image layer.
fn unmount_under(dir: &Path) {
    let Ok(all) = crate::image::rootfs::mount_points() else {
        return;
    };
    let mut points: Vec<PathBuf> = all
        .into_iter()
        .filter(|p| p.starts_with(dir) && p != dir)
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        tracing::warn!(path = %p.display(), "unmounting a leftover mount of a removed pod");
        let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A new 64-hex-digit id, as containerd's.
pub fn new_id() -> Result<String, SandboxError> {
    let mut bytes = [0u8; 32];
    getrandom(&mut bytes).map_err(|source| SandboxError::Io {
        what: "reading random bytes for an id".into(),
        source,
    })?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

pub(crate) fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

/// Nanoseconds since the Unix epoch.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The last `lines` lines of a console log.
fn console_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
