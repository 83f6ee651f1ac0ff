//! cgroup v2 in the guest: one pod cgroup (`/sys/fs/cgroup/pod`) with all
//! available controllers enabled for its children, one child per container
//! holding the CRI limits. Limits are written before the container's
//! process joins, and rewritten in place by UpdateContainerResources.

use std::path::{Path, PathBuf};
use std::time::Duration;

use carapace_agent_api::v1::{CpuStats, IoStats, MemoryStats, PidsStats};
use oci_spec::runtime::LinuxResources;

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const POD_CGROUP: &str = "pod";
/// statfs(2) magic of cgroup2.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Errors of the cgroup code; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid resources: {0}")]
    Invalid(String),
    #[error("{0} is not supported by the guest kernel")]
    Unsupported(String),
    #[error("cgroup {0} still has processes")]
    Busy(PathBuf),
}

type Result<T> = std::result::Result<T, CgroupError>;

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

fn write(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value).map_err(io_err("writing", path))
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(io_err("reading", path))
}

/// The pod's cgroup tree; `None` from [`Cgroups::detect`] when the guest has
/// no cgroup2 at /sys/fs/cgroup (e.g. the agent run on a cgroup v1 host).
#[derive(Debug)]
pub struct Cgroups {
    pod: PathBuf,
}

impl Cgroups {
    pub fn detect() -> Option<Cgroups> {
        let st = nix::sys::statfs::statfs(CGROUP_ROOT).ok()?;
        #[allow(clippy::unnecessary_cast)] // the type differs between libcs
        let magic = st.filesystem_type().0 as i64;
        (magic == CGROUP2_SUPER_MAGIC).then(|| Cgroups {
            pod: Path::new(CGROUP_ROOT).join(POD_CGROUP),
        })
    }

    /// Creates the pod cgroup (once) and enables every controller the
    /// kernel offers for the containers under it.
    fn ensure_pod(&self) -> Result<()> {
        let root = Path::new(CGROUP_ROOT);
        if !self.pod.is_dir() {
            std::fs::create_dir(&self.pod).map_err(io_err("creating", &self.pod))?;
        }
        let controllers = read(&root.join("cgroup.controllers"))?;
        let enable: String = controllers
            .split_whitespace()
            .map(|c| format!("+{c} "))
            .collect();
        write(&root.join("cgroup.subtree_control"), enable.trim())?;
        write(&self.pod.join("cgroup.subtree_control"), enable.trim())
    }

    /// Creates the container's cgroup with `resources` applied. A failure
    /// removes what was created.
    pub fn create(&self, id: &str, resources: Option<&LinuxResources>) -> Result<Cgroup> {
        self.ensure_pod()?;
        let path = self.pod.join(id);
        std::fs::create_dir(&path).map_err(io_err("creating", &path))?;
        let cgroup = Cgroup { path };
        if let Some(r) = resources {
            if let Err(e) = cgroup.apply(r) {
                let _ = std::fs::remove_dir(&cgroup.path);
                return Err(e);
            }
        }
        Ok(cgroup)
    }
}

/// Whether `r` asks for limits that only a cgroup can give.
pub fn has_limits(r: &LinuxResources) -> bool {
    r.cpu().is_some()
        || r.memory().is_some()
        || r.pids().is_some()
        || r.hugepage_limits().as_ref().is_some_and(|h| !h.is_empty())
        || r.unified().as_ref().is_some_and(|u| !u.is_empty())
}

/// Converts CRI/OCI cpu shares (2..262144) to cgroup v2 cpu.weight
/// (1..10000), as runc does.
pub fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 100;
    }
    1 + ((shares.clamp(2, 262_144) - 2) * 9999) / 262_142
}

/// The (file, value) writes that apply `r`, in order. Pure, so it is
/// checked without a cgroup.
pub fn plan(r: &LinuxResources) -> Result<Vec<(String, String)>> {
    let mut w: Vec<(String, String)> = Vec::new();
    if let Some(cpu) = r.cpu() {
        if let Some(shares) = cpu.shares() {
            w.push(("cpu.weight".into(), shares_to_weight(shares).to_string()));
        }
        if cpu.quota().is_some() || cpu.period().is_some() {
            let period = cpu.period().unwrap_or(100_000);
            let quota = match cpu.quota() {
                Some(q) if q > 0 => q.to_string(),
                _ => "max".into(),
            };
            w.push(("cpu.max".into(), format!("{quota} {period}")));
        }
        if let Some(cpus) = cpu.cpus().as_deref().filter(|s| !s.is_empty()) {
            w.push(("cpuset.cpus".into(), cpus.to_owned()));
        }
        if let Some(mems) = cpu.mems().as_deref().filter(|s| !s.is_empty()) {
            w.push(("cpuset.mems".into(), mems.to_owned()));
        }
    }
    if let Some(mem) = r.memory() {
        let limit = mem.limit().filter(|l| *l > 0);
        if let Some(low) = mem.reservation().filter(|l| *l > 0) {
            w.push(("memory.low".into(), low.to_string()));
        }
        match limit {
            Some(l) => w.push(("memory.max".into(), l.to_string())),
            None if mem.limit() == Some(-1) => w.push(("memory.max".into(), "max".into())),
            None => {}
        }
        // OCI swap is memory+swap; cgroup v2 counts swap alone.
        match (mem.swap(), limit) {
            (Some(-1), _) => w.push(("memory.swap.max".into(), "max".into())),
            (Some(swap), Some(l)) if swap > 0 => {
                if swap < l {
                    return Err(CgroupError::Invalid(format!(
                        "memory+swap limit {swap} is below the memory limit {l}"
                    )));
                }
                w.push(("memory.swap.max".into(), (swap - l).to_string()));
            }
            (Some(swap), None) if swap > 0 => {
                return Err(CgroupError::Invalid(
                    "a swap limit needs a memory limit".into(),
                ))
            }
            _ => {}
        }
    }
    if let Some(pids) = r.pids() {
        let limit = pids.limit();
        let value = if limit > 0 {
            limit.to_string()
        } else {
            "max".into()
        };
        w.push(("pids.max".into(), value));
    }
    for h in r.hugepage_limits().iter().flatten() {
        let size = h.page_size();
        if !size.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(CgroupError::Invalid(format!("hugepage size {size:?}")));
        }
        w.push((format!("hugetlb.{size}.max"), h.limit().to_string()));
    }
    if let Some(unified) = r.unified() {
        let mut keys: Vec<_> = unified.iter().collect();
        keys.sort();
        for (key, value) in keys {
            if key.contains('/') || key.starts_with('.') || !key.contains('.') {
                return Err(CgroupError::Invalid(format!("unified key {key:?}")));
            }
            w.push((key.clone(), value.clone()));
        }
    }
    Ok(w)
}

/// One container's cgroup.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    pub fn procs_file(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    /// Writes the limits in `r`; values not in `r` are left as they are.
    pub fn apply(&self, r: &LinuxResources) -> Result<()> {
        for (file, value) in plan(r)? {
            let path = self.path.join(&file);
            if !path.exists() {
                // No swap in the guest kernel: no swap (0) or unlimited
                // swap (max) of no swap device is what it does anyway.
                if file == "memory.swap.max" && (value == "0" || value == "max") {
                    continue;
                }
                // kubelet sends a zero limit for every huge page size the
                // host has; a size the guest lacks cannot be used anyway.
                if file.starts_with("hugetlb.") && value == "0" {
                    continue;
                }
                return Err(CgroupError::Unsupported(file));
            }
            write(&path, &value)?;
        }
        Ok(())
    }

    fn read_keyed(&self, file: &str) -> Vec<(String, u64)> {
        std::fs::read_to_string(self.path.join(file))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                Some((it.next()?.to_owned(), it.next()?.parse().ok()?))
            })
            .collect()
    }

    fn read_u64(&self, file: &str) -> u64 {
        std::fs::read_to_string(self.path.join(file))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// OOM kills in this cgroup so far.
    pub fn oom_kills(&self) -> u64 {
        key(&self.read_keyed("memory.events"), "oom_kill")
    }

    pub fn cpu_stats(&self) -> CpuStats {
        let s = self.read_keyed("cpu.stat");
        CpuStats {
            usage_usec: key(&s, "usage_usec"),
            user_usec: key(&s, "user_usec"),
            system_usec: key(&s, "system_usec"),
            nr_throttled: key(&s, "nr_throttled"),
            throttled_usec: key(&s, "throttled_usec"),
        }
    }

    pub fn memory_stats(&self) -> MemoryStats {
        let s = self.read_keyed("memory.stat");
        let usage = self.read_u64("memory.current");
        MemoryStats {
            usage_bytes: usage,
            working_set_bytes: usage.saturating_sub(key(&s, "inactive_file")),
            anon_bytes: key(&s, "anon"),
            file_bytes: key(&s, "file"),
            limit_bytes: self.read_u64("memory.max"),
            oom_kills: self.oom_kills(),
        }
    }

    pub fn pids_stats(&self) -> PidsStats {
        PidsStats {
            current: self.read_u64("pids.current"),
            limit: self.read_u64("pids.max"),
        }
    }

    pub fn io_stats(&self) -> IoStats {
        let mut io = IoStats::default();
        let text = std::fs::read_to_string(self.path.join("io.stat")).unwrap_or_default();
        for field in text.split_whitespace() {
            let Some((k, v)) = field.split_once('=') else {
                continue;
            };
            let v: u64 = v.parse().unwrap_or(0);
            match k {
                "rbytes" => io.read_bytes += v,
                "wbytes" => io.write_bytes += v,
                "rios" => io.read_ops += v,
                "wios" => io.write_ops += v,
                _ => {}
            }
        }
        io
    }

    /// Kills every process in the cgroup (cgroup.kill, else one by one).
    pub fn kill_all(&self) {
        let kill_file = self.path.join("cgroup.kill");
        if kill_file.exists() && std::fs::write(&kill_file, "1").is_ok() {
            return;
        }
        for pid in std::fs::read_to_string(self.procs_file())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse::<i32>().ok())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// Removes the cgroup once its processes are gone (killed first).
    pub async fn remove(&self) -> Result<()> {
        self.kill_all();
        for _ in 0..200 {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => return Err(io_err("removing", &self.path)(e)),
            }
        }
        Err(CgroupError::Busy(self.path.clone()))
    }
}

fn key(pairs: &[(String, u64)], name: &str) -> u64 {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| *v)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resources(json: &str) -> LinuxResources {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn zero_limits_of_absent_controls_are_skipped_others_refused() {
        // A directory with only the files a guest without hugetlb and swap
        // has.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("memory.max"), "max").unwrap();
        let cg = Cgroup {
            path: dir.path().to_owned(),
        };
        let kubelet_like = resources(
            r#"{"memory":{"limit":1048576,"swap":1048576},
                "hugepageLimits":[{"pageSize":"2MB","limit":0},{"pageSize":"1GB","limit":0}]}"#,
        );
        // swap == limit: no swap (written as 0).
        cg.apply(&kubelet_like).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("memory.max")).unwrap(),
            "1048576"
        );
        let wants_hugepages =
            resources(r#"{"hugepageLimits":[{"pageSize":"2MB","limit":2097152}]}"#);
        assert!(matches!(
            cg.apply(&wants_hugepages),
            Err(CgroupError::Unsupported(f)) if f == "hugetlb.2MB.max"
        ));
    }

    #[test]
    fn converts_shares_like_runc() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(0), 100);
    }

    #[test]
    fn plans_cri_limits() {
        let r = resources(
            r#"{"cpu":{"shares":512,"quota":50000,"period":100000,"cpus":"0"},
                "memory":{"limit":67108864,"swap":67108864},
                "pids":{"limit":64},
                "hugepageLimits":[{"pageSize":"2MB","limit":0}],
                "unified":{"memory.high":"60000000"}}"#,
        );
        let plan = plan(&r).unwrap();
        let get = |k: &str| plan.iter().find(|(f, _)| f == k).map(|(_, v)| v.as_str());
        assert_eq!(get("cpu.weight"), Some("20"));
        assert_eq!(get("cpu.max"), Some("50000 100000"));
        assert_eq!(get("cpuset.cpus"), Some("0"));
        assert_eq!(get("memory.max"), Some("67108864"));
        assert_eq!(get("memory.swap.max"), Some("0"));
        assert_eq!(get("pids.max"), Some("64"));
        assert_eq!(get("hugetlb.2MB.max"), Some("0"));
        assert_eq!(get("memory.high"), Some("60000000"));
    }

    #[test]
    fn applies_to_existing_files_and_tolerates_a_kernel_without_swap() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["memory.max", "pids.max"] {
            std::fs::write(dir.path().join(f), "max\n").unwrap();
        }
        let cg = Cgroup {
            path: dir.path().to_owned(),
        };
        cg.apply(&resources(
            r#"{"memory":{"limit":1048576,"swap":-1},"pids":{"limit":3}}"#,
        ))
        .unwrap();
        let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap();
        assert_eq!(read("memory.max"), "1048576");
        assert_eq!(read("pids.max"), "3");
        // A controller the kernel lacks is an error naming the file.
        let err = cg
            .apply(&resources(r#"{"cpu":{"quota":1000,"period":10000}}"#))
            .unwrap_err();
        assert!(
            matches!(&err, CgroupError::Unsupported(f) if f == "cpu.max"),
            "{err}"
        );
    }

    #[test]
    fn refuses_bad_values_before_writing_anything() {
        for bad in [
            r#"{"memory":{"limit":100,"swap":50}}"#,
            r#"{"memory":{"swap":50}}"#,
            r#"{"unified":{"../../etc/passwd":"x"}}"#,
            r#"{"hugepageLimits":[{"pageSize":"2MB/../x","limit":0}]}"#,
        ] {
            assert!(
                matches!(plan(&resources(bad)), Err(CgroupError::Invalid(_))),
                "{bad}"
            );
        }
        assert!(!has_limits(&resources(
            r#"{"devices":[{"allow":false,"access":"rwm"}]}"#
        )));
        assert!(has_limits(&resources(r#"{"pids":{"limit":5}}"#)));
    }
}
