//! The container's cgroup limits (`linux.resources`) and OOM score.

use std::collections::BTreeMap;

use k8s_cri::v1 as cri;
use serde_json::{json, Map, Value};

use super::{invalid, SpecError};

fn is_cpuset(s: &str) -> bool {
    s.split(',').all(|range| {
        let mut ends = range.splitn(2, '-');
        ends.all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    })
}

fn is_page_size(s: &str) -> bool {
    let digits = s.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &s[digits.len()..];
    !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && matches!(unit, "KB" | "MB" | "GB" | "TB" | "PB")
}

/// `linux.resources` (only what CRI sets: the agent needs cgroups for any
/// section present) and the OOM score adjustment.
pub(super) fn resources(
    r: Option<&cri::LinuxContainerResources>,
) -> Result<(Option<Value>, Option<i32>), SpecError> {
    const FIELD: &str = "linux.resources";
    let Some(r) = r else {
        return Ok((None, None));
    };
    let negative = |name: &str, v: i64| -> Result<(), SpecError> {
        if v < 0 {
            Err(invalid(
                format!("{FIELD}.{name}"),
                format!("{v} is negative"),
            ))
        } else {
            Ok(())
        }
    };
    let mut out = Map::new();

    let mut cpu = Map::new();
    negative("cpu_shares", r.cpu_shares)?;
    negative("cpu_period", r.cpu_period)?;
    if r.cpu_shares > 0 {
        cpu.insert("shares".into(), json!(r.cpu_shares));
    }
    if r.cpu_quota != 0 {
        cpu.insert("quota".into(), json!(r.cpu_quota));
    }
    if r.cpu_period > 0 {
        cpu.insert("period".into(), json!(r.cpu_period));
    }
    for (name, value, key) in [
        ("cpuset_cpus", &r.cpuset_cpus, "cpus"),
        ("cpuset_mems", &r.cpuset_mems, "mems"),
    ] {
        if value.is_empty() {
            continue;
        }
        if !is_cpuset(value) {
            return Err(invalid(
                format!("{FIELD}.{name}"),
                format!("{value:?} is not a list of ranges like 0-3,5"),
            ));
        }
        cpu.insert(key.into(), json!(value));
    }
    if !cpu.is_empty() {
        out.insert("cpu".into(), Value::Object(cpu));
    }

    let mut memory = Map::new();
    negative("memory_limit_in_bytes", r.memory_limit_in_bytes)?;
    if r.memory_limit_in_bytes > 0 {
        memory.insert("limit".into(), json!(r.memory_limit_in_bytes));
    }
    match r.memory_swap_limit_in_bytes {
        0 if r.memory_limit_in_bytes > 0 => {
            // No swap by default (memory+swap = memory), as containerd.
            memory.insert("swap".into(), json!(r.memory_limit_in_bytes));
        }
        0 => {}
        -1 => {
            memory.insert("swap".into(), json!(-1));
        }
        s if s > 0 => {
            if r.memory_limit_in_bytes > 0 && s < r.memory_limit_in_bytes {
                return Err(invalid(
                    format!("{FIELD}.memory_swap_limit_in_bytes"),
                    format!("{s} is below the memory limit {}", r.memory_limit_in_bytes),
                ));
            }
            memory.insert("swap".into(), json!(s));
        }
        s => {
            return Err(invalid(
                format!("{FIELD}.memory_swap_limit_in_bytes"),
                format!("{s} is negative"),
            ))
        }
    }
    if !memory.is_empty() {
        out.insert("memory".into(), Value::Object(memory));
    }

    let mut hugepages = Vec::new();
    for h in &r.hugepage_limits {
        if !is_page_size(&h.page_size) {
            return Err(invalid(
                format!("{FIELD}.hugepage_limits"),
                format!("page size {:?} is not like 2MB or 1GB", h.page_size),
            ));
        }
        hugepages.push(json!({ "pageSize": h.page_size, "limit": h.limit }));
    }
    if !hugepages.is_empty() {
        out.insert("hugepageLimits".into(), json!(hugepages));
    }

    if !r.unified.is_empty() {
        for key in r.unified.keys() {
            if key.contains('/') || key.starts_with('.') || !key.contains('.') {
                return Err(invalid(
                    format!("{FIELD}.unified"),
                    format!("{key:?} is not a cgroup v2 file name like memory.high"),
                ));
            }
        }
        let unified: BTreeMap<&String, &String> = r.unified.iter().collect();
        out.insert("unified".into(), json!(unified));
    }

    let adj = i32::try_from(r.oom_score_adj)
        .ok()
        .filter(|a| (-1000..=1000).contains(a))
        .ok_or_else(|| {
            invalid(
                format!("{FIELD}.oom_score_adj"),
                format!("{} is outside -1000..=1000", r.oom_score_adj),
            )
        })?;
    let out = (!out.is_empty()).then_some(Value::Object(out));
    Ok((out, Some(adj)))
}
