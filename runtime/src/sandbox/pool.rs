//! The warm pool (`vm.warm_pool`): VMs of the default size booted ahead of
//! the pods that will get them, as Kata's VM cache does.
//!
//! A warm VM is what a cold RunPodSandbox would have made before knowing its
//! pod: its run directory and network namespace named by the id the sandbox
//! will have, a tap in that namespace that is connected to nothing yet, the
//! VM booted on it with a random MAC, and the agent connected and healthy.
//! Taking one leaves the pod's own part: CNI ADD in that namespace, the tap
//! joined to eth0, the VM moved into kubelet's pod cgroup, and SetupSandbox
//! (which gives the guest interface eth0's MAC). A VM is never handed to a
//! second pod: once taken it is the pod's, and a replacement boots at once.
//!
//! Each warm VM is recorded under `state_dir/warm` from before its first
//! process starts, so that one a dead daemon left behind is stopped and
//! removed at the next start; a daemon shutting down stops its own.

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use super::{new_id, SandboxError, VmSize, RUN_DIR_NAME_LEN};
use crate::agent_client::AgentClient;
use crate::config::Config;
use crate::network::tap::{self, VmNetwork};
use crate::network::{netns, Network};
use crate::state::RecordDir;
use crate::vm::{StartedVm, VmDriver, VmHandle, VmSpec};

/// A booted VM waiting for its pod.
#[derive(Debug)]
pub struct WarmVm {
    /// The id its sandbox will have: it names the run directory and the
    /// network namespace.
    pub id: String,
    pub vm: StartedVm,
    pub agent: AgentClient,
    pub run_dir: PathBuf,
    /// The namespace with the unconnected tap, and the MAC the guest
    /// device has; `None` for a VM booted while pods got no network.
    pub network: Option<VmNetwork>,
}

/// What is on disk about a warm VM until a sandbox owns it.
#[derive(Debug, Serialize, Deserialize)]
struct WarmRecord {
    id: String,
    run_dir: PathBuf,
    netns: Option<PathBuf>,
    /// Written as soon as the VM's processes run.
    vm: Option<VmHandle>,
}

type Slot = JoinHandle<Result<WarmVm, SandboxError>>;

/// The daemon's warm VMs, booting or ready, oldest first.
pub struct WarmPool {
    target: usize,
    size: VmSize,
    config: Config,
    driver: VmDriver,
    network: Network,
    records: RecordDir,
    slots: Mutex<VecDeque<Slot>>,
    closed: AtomicBool,
}

impl WarmPool {
    /// Opens the pool's records and removes the warm VMs a previous daemon
    /// left (those that became `sandboxes` only lose their warm record).
    /// Nothing boots until [`WarmPool::fill`].
    pub fn open(
        config: &Config,
        driver: VmDriver,
        network: Network,
        sandboxes: &HashSet<String>,
    ) -> Result<Self, SandboxError> {
        let records = RecordDir::open(&config.state_dir, "warm")?;
        let pool = Self {
            target: usize::from(config.vm.warm_pool),
            size: default_size(config),
            config: config.clone(),
            driver,
            network,
            records,
            slots: Mutex::new(VecDeque::new()),
            closed: AtomicBool::new(false),
        };
        pool.remove_leftovers(sandboxes);
        Ok(pool)
    }

    /// Starts booting VMs until the pool holds its target (booting or
    /// ready); nothing once shut down.
    pub fn fill(self: &Arc<Self>) {
        if self.closed.load(Ordering::SeqCst) {
            return;
        }
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        while slots.len() < self.target {
            let pool = self.clone();
            slots.push_back(tokio::spawn(async move {
                let booted = pool.boot().await;
                if let Err(e) = &booted {
                    tracing::warn!("a warm VM did not boot: {e}");
                }
                booted
            }));
        }
    }

    /// A warm VM for a pod of `size` that gets a network or not, waiting
    /// for the oldest one to finish booting if none is ready yet; `None`
    /// when the pool is off, the size is not the pool's, or the VM at hand
    /// is unusable (it died, or was booted with the other network choice:
    /// it is removed). A replacement starts booting at once.
    pub async fn take(self: &Arc<Self>, size: VmSize, with_network: bool) -> Option<WarmVm> {
        if size != self.size {
            return None;
        }
        let slot = self
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()?;
        self.fill();
        let warm = match slot.await {
            Ok(Ok(warm)) => warm,
            Ok(Err(_)) => return None,
            Err(e) => {
                tracing::warn!("a warm VM's boot was cut short: {e}");
                return None;
            }
        };
        if !warm.vm.handle.is_running() {
            tracing::warn!(id = %warm.id, "a warm VM exited while it waited; booting a pod VM");
            self.discard(warm).await;
            return None;
        }
        if warm.network.is_some() != with_network {
            tracing::info!(id = %warm.id, "the network configuration changed since this warm VM booted");
            self.discard(warm).await;
            return None;
        }
        Some(warm)
    }

    /// The sandbox now owns the VM `id` (its own record is saved): the
    /// pool forgets it.
    pub fn forget(&self, id: &str) {
        if let Err(e) = self.records.remove(id) {
            tracing::warn!(id, "removing the warm VM record: {e}");
        }
    }

    /// Stops a warm VM and removes everything of it.
    pub async fn discard(&self, warm: WarmVm) {
        warm.vm.stop().await;
        self.remove(&WarmRecord {
            id: warm.id,
            run_dir: warm.run_dir,
            netns: warm.network.map(|n| n.netns),
            vm: None,
        });
    }

    /// Stops every warm VM, booting or ready, and boots no more.
    pub async fn shutdown(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let slots: Vec<Slot> = self
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        if !slots.is_empty() {
            tracing::info!("stopping {} warm VMs", slots.len());
        }
        for slot in slots {
            slot.abort();
            if let Ok(Ok(warm)) = slot.await {
                tracing::debug!(id = %warm.id, "stopping a warm VM");
                self.discard(warm).await;
            }
        }
        // Boots cut short left their processes and record: the processes
        // are stopped before the daemon exits (a process it only signalled
        // would outlive it, or stay as init's zombie).
        let (records, _) = self.records.load_all::<WarmRecord>();
        for vm in records.iter().filter_map(|record| record.vm.as_ref()) {
            vm.stop().await;
        }
        self.remove_leftovers(&HashSet::new());
    }

    /// Boots one warm VM; on failure nothing of it is left.
    async fn boot(&self) -> Result<WarmVm, SandboxError> {
        let id = new_id()?;
        let run_dir = self.config.run_dir.join(&id[..RUN_DIR_NAME_LEN]);
        let mut record = WarmRecord {
            id: id.clone(),
            run_dir: run_dir.clone(),
            netns: None,
            vm: None,
        };
        self.records.save(&id, &record)?;
        let result = self.boot_recorded(&mut record).await;
        if result.is_err() {
            self.remove(&record);
        }
        result
    }

    async fn boot_recorded(&self, record: &mut WarmRecord) -> Result<WarmVm, SandboxError> {
        let io = |what: String| move |source| SandboxError::Io { what, source };
        let share_dir = record.run_dir.join("shared");
        std::fs::create_dir_all(&share_dir)
            .map_err(io(format!("creating {}", share_dir.display())))?;
        let network = match self.network.conf() {
            Ok(_) => {
                let path = self.network.netns_path(&record.id);
                netns::create(&path)?;
                record.netns = Some(path.clone());
                self.records.save(&record.id, record)?;
                let ns = path.clone();
                tokio::task::spawn_blocking(move || tap::add_tap(&ns))
                    .await
                    .map_err(|e| io("creating the tap".into())(std::io::Error::other(e)))??;
                Some(VmNetwork {
                    netns: path,
                    tap: tap::TAP_IFNAME.into(),
                    mac: random_mac()?,
                    mtu: 0,
                })
            }
            Err(_) => None,
        };
        let spec = VmSpec {
            kernel: self.config.vm.kernel.clone(),
            initrd: self.config.vm.initrd.clone(),
            vcpus: self.size.vcpus,
            mem_mib: self.size.mem_mib,
            extra_cmdline: String::new(),
            run_dir: record.run_dir.clone(),
            shared_dir: Some(share_dir),
            network: network.clone(),
        };
        let vm = self.driver.start(&spec).await?;
        record.vm = Some(vm.handle.clone());
        if let Err(e) = self.records.save(&record.id, record) {
            vm.stop().await;
            return Err(e.into());
        }
        let timeout = Duration::from_secs(self.config.vm.boot_timeout_secs);
        match vm.wait_agent(timeout).await {
            Ok((agent, _)) => {
                tracing::info!(
                    id = %record.id,
                    boot_ms = vm.started_at().elapsed().as_millis() as u64,
                    "warm VM ready"
                );
                Ok(WarmVm {
                    id: record.id.clone(),
                    vm,
                    agent,
                    run_dir: record.run_dir.clone(),
                    network,
                })
            }
            Err(e) => {
                let console = super::console_tail(vm.console_log(), 20);
                vm.stop().await;
                Err(SandboxError::AgentNotReady {
                    reason: e.to_string(),
                    console,
                })
            }
        }
    }

    /// Removes the warm VMs on record, except the `sandboxes`' (whose
    /// record only goes).
    fn remove_leftovers(&self, sandboxes: &HashSet<String>) {
        let (records, skipped) = self.records.load_all::<WarmRecord>();
        for s in skipped {
            tracing::error!(
                "removing unreadable warm VM record {}: {}",
                s.path.display(),
                s.reason
            );
            let _ = std::fs::remove_file(&s.path);
        }
        for record in records {
            if sandboxes.contains(&record.id) {
                self.forget(&record.id);
            } else {
                tracing::info!(id = %record.id, "removing a warm VM left by a previous daemon");
                self.remove(&record);
            }
        }
    }

    /// Kills the recorded VM's processes and removes its namespace, run
    /// directory and record.
    fn remove(&self, record: &WarmRecord) {
        if let Some(vm) = &record.vm {
            vm.kill_now();
        }
        if let Some(ns) = &record.netns {
            if let Err(e) = netns::remove(ns) {
                tracing::warn!(id = %record.id, "removing a warm VM's network namespace: {e}");
            }
        }
        // Only a prefix of an id names a run directory: check it is this
        // VM's before removing anything.
        if record.run_dir.starts_with(&self.config.run_dir)
            && record.id.starts_with(
                record
                    .run_dir
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("-"),
            )
        {
            let _ = std::fs::remove_dir_all(&record.run_dir);
        }
        self.forget(&record.id);
    }
}

/// The VM size of a pod without CPU or memory limits.
pub fn default_size(config: &Config) -> VmSize {
    VmSize {
        vcpus: config.vm.default_vcpus,
        mem_mib: config
            .vm
            .default_mem_mib
            .saturating_add(config.vm.overhead_mem_mib),
    }
}

/// A random locally administered unicast MAC, for a warm VM's device until
/// its pod's eth0 MAC replaces it.
fn random_mac() -> Result<String, SandboxError> {
    let mut bytes = [0u8; 6];
    super::getrandom(&mut bytes).map_err(|source| SandboxError::Io {
        what: "reading random bytes for a MAC".into(),
        source,
    })?;
    bytes[0] = (bytes[0] & 0xfc) | 0x02;
    Ok(bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::process::VmProcess;

    /// A VM whose monitor is a `sleep`, with its sockets and log in `run_dir`.
    fn sleeping_vm(run_dir: &std::path::Path) -> VmHandle {
        let mut sleep = tokio::process::Command::new("sleep");
        sleep.arg("60");
        VmHandle {
            monitor: VmProcess::spawn("qemu", sleep, &run_dir.join("sleep.log")).unwrap(),
            backend: None,
            fs: None,
            vsock_socket: run_dir.join("vsock.sock"),
            vhost_socket: None,
            fs_socket: None,
            api_socket: None,
            console_log: run_dir.join("console.log"),
        }
    }

    /// What a daemon that crashed leaves: a warm VM with a process and a
    /// namespace, one without either yet, one a pod had already taken, a
    /// corrupt record, and a record pointing outside the run directory.
    #[tokio::test]
    async fn leftovers_are_removed_and_a_pods_vm_is_only_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config {
            state_dir: dir.path().join("state"),
            run_dir: dir.path().join("run"),
            ..Config::default()
        };
        config.network.netns_dir = dir.path().join("netns");
        let records = RecordDir::open(&config.state_dir, "warm").unwrap();
        let id = |c: char| c.to_string().repeat(64);
        let run_dir = |c: char| config.run_dir.join(c.to_string().repeat(16));
        for c in ['a', 'b', 'p'] {
            std::fs::create_dir_all(run_dir(c).join("shared")).unwrap();
        }
        let vm = sleeping_vm(&run_dir('a'));
        assert!(vm.is_running());
        let netns = config.network.netns_dir.join(id('a'));
        netns::create(&netns).unwrap();
        let record = |c: char, run_dir: PathBuf, netns, vm| WarmRecord {
            id: id(c),
            run_dir,
            netns,
            vm,
        };
        records
            .save(
                &id('a'),
                &record('a', run_dir('a'), Some(netns.clone()), Some(vm.clone())),
            )
            .unwrap();
        records
            .save(&id('b'), &record('b', run_dir('b'), None, None))
            .unwrap();
        records
            .save(&id('p'), &record('p', run_dir('p'), None, None))
            .unwrap();
        let outside = dir.path().join("elsewhere");
        std::fs::create_dir_all(&outside).unwrap();
        records
            .save(&id('c'), &record('c', outside.clone(), None, None))
            .unwrap();
        std::fs::write(config.state_dir.join("warm").join("d.json"), b"{not json").unwrap();

        let driver = VmDriver::Qemu(crate::vm::qemu::QemuDriver::from_host().unwrap());
        let network = Network::new(config.network.clone());
        let pods = HashSet::from([id('p')]);
        let pool = WarmPool::open(&config, driver, network, &pods).unwrap();

        assert!(vm.monitor.wait_exit(Duration::from_secs(5)).await, "killed");
        assert!(!netns.exists(), "namespace removed");
        assert!(!run_dir('a').exists() && !run_dir('b').exists());
        assert!(run_dir('p').exists(), "the pod's run directory stays");
        assert!(
            outside.exists(),
            "nothing outside the run directory is removed"
        );
        let left = std::fs::read_dir(config.state_dir.join("warm"))
            .unwrap()
            .count();
        assert_eq!(left, 0, "every warm record is gone");
        // Only pods of the pool's size take from it (the slot here is a
        // boot that failed; `warm_pool = 0` keeps take() from refilling).
        let pool = Arc::new(WarmPool { target: 0, ..pool });
        pool.slots.lock().unwrap().push_back(tokio::spawn(async {
            Err(SandboxError::InvalidArgument("no kernel".into()))
        }));
        let other = VmSize {
            vcpus: 2,
            ..default_size(&config)
        };
        assert!(pool.take(other, false).await.is_none());
        assert_eq!(pool.slots.lock().unwrap().len(), 1, "left for its size");
        assert!(pool.take(default_size(&config), false).await.is_none());
        assert!(
            pool.slots.lock().unwrap().is_empty(),
            "a failed boot is dropped"
        );
    }

    /// The daemon stops while a warm VM boots: its process is gone (not
    /// only signalled) and its record removed when shutdown() returns.
    #[tokio::test]
    async fn shutdown_stops_a_vm_still_booting() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            state_dir: dir.path().join("state"),
            run_dir: dir.path().join("run"),
            ..Config::default()
        };
        let driver = VmDriver::Qemu(crate::vm::qemu::QemuDriver::from_host().unwrap());
        let network = Network::new(config.network.clone());
        let pool = WarmPool::open(&config, driver, network, &HashSet::new()).unwrap();
        let pool = Arc::new(WarmPool { target: 0, ..pool });

        // A boot that recorded its monitor and now waits for the agent.
        let run_dir = config.run_dir.join("b".repeat(16));
        std::fs::create_dir_all(&run_dir).unwrap();
        let vm = sleeping_vm(&run_dir);
        let record = WarmRecord {
            id: "b".repeat(64),
            run_dir: run_dir.clone(),
            netns: None,
            vm: Some(vm.clone()),
        };
        pool.records.save(&record.id, &record).unwrap();
        pool.slots
            .lock()
            .unwrap()
            .push_back(tokio::spawn(std::future::pending()));

        pool.shutdown().await;
        let pid = vm.monitor.pid;
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "the booting VM's process is gone, not a zombie"
        );
        assert!(!run_dir.exists());
        assert_eq!(
            std::fs::read_dir(config.state_dir.join("warm"))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn random_macs_are_local_unicast() {
        for _ in 0..32 {
            let mac = random_mac().unwrap();
            let first = u8::from_str_radix(&mac[..2], 16).unwrap();
            assert_eq!(first & 0x03, 0x02, "{mac}");
            assert_eq!(mac.len(), 17);
        }
        assert_ne!(random_mac().unwrap(), random_mac().unwrap());
    }
}
