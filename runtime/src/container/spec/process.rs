//! The container's process: arguments, environment, working directory,
//! user and capabilities.

use std::collections::BTreeSet;

use k8s_cri::v1 as cri;

use super::{invalid, SpecError, ALL_CAPABILITIES, DEFAULT_CAPABILITIES, DEFAULT_PATH};
use crate::image::manifest::ImageConfig;

/// Command and args as Kubernetes documents them (containerd's
/// `WithProcessArgs`).
pub(super) fn args(
    config: &cri::ContainerConfig,
    image: &ImageConfig,
) -> Result<Vec<String>, SpecError> {
    let mut command = config.command.clone();
    let mut args = config.args.clone();
    if command.is_empty() {
        if args.is_empty() {
            args = image.cmd.clone();
        }
        let no_entrypoint = image.entrypoint.len() == 1 && image.entrypoint[0].is_empty();
        if !no_entrypoint {
            command = image.entrypoint.clone();
        }
    }
    command.extend(args);
    if command.is_empty() {
        return Err(invalid(
            "command",
            "no command specified: neither command nor args is set, and the image has no Entrypoint or Cmd",
        ));
    }
    if command[0].is_empty() {
        return Err(invalid("command", "the executable (first word) is empty"));
    }
    if command.iter().any(|a| a.contains('\0')) {
        return Err(invalid("command", "an argument contains a NUL byte"));
    }
    Ok(command)
}

/// A valid environment variable name, as Kubernetes defines it: printable
/// ASCII but `=`.
pub(super) fn valid_env_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'=')
}

/// Environment variables in order of first appearance, later values
/// replacing earlier ones (containerd's `WithEnv`).
#[derive(Default)]
struct Env {
    entries: Vec<(String, Option<String>)>,
}

impl Env {
    fn set(&mut self, key: &str, value: Option<&str>) {
        let value = value.map(str::to_owned);
        match self.entries.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value,
            None if value.is_some() => self.entries.push((key.to_owned(), value)),
            None => {}
        }
    }

    fn into_list(self) -> Vec<String> {
        self.entries
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| format!("{k}={v}")))
            .collect()
    }
}

pub(super) fn environment(
    config: &cri::ContainerConfig,
    image: &ImageConfig,
    hostname: &str,
) -> Result<Vec<String>, SpecError> {
    let mut env = Env::default();
    env.set("PATH", Some(DEFAULT_PATH));
    if !hostname.is_empty() {
        env.set("HOSTNAME", Some(hostname));
    }
    for entry in &image.env {
        if entry.contains('\0') {
            return Err(invalid(
                "image config Env",
                format!("{entry:?} contains a NUL byte"),
            ));
        }
        match entry.split_once('=') {
            Some((k, v)) => env.set(k, Some(v)),
            // containerd: an entry without `=` unsets the variable.
            None => env.set(entry, None),
        }
    }
    for (i, kv) in config.envs.iter().enumerate() {
        if !valid_env_name(&kv.key) {
            return Err(invalid(
                format!("envs[{i}].key"),
                format!(
                    "{:?} is not a valid variable name (printable ASCII other than '=')",
                    kv.key
                ),
            ));
        }
        if kv.value.contains('\0') {
            return Err(invalid(format!("envs[{i}].value"), "contains a NUL byte"));
        }
        env.set(&kv.key, Some(&kv.value));
    }
    Ok(env.into_list())
}

pub(super) fn working_dir(
    config: &cri::ContainerConfig,
    image: &ImageConfig,
) -> Result<String, SpecError> {
    let (field, dir) = if !config.working_dir.is_empty() {
        ("working_dir", config.working_dir.as_str())
    } else if !image.working_dir.is_empty() {
        ("image config WorkingDir", image.working_dir.as_str())
    } else {
        return Ok("/".into());
    };
    if !dir.starts_with('/') || dir.contains('\0') {
        return Err(invalid(field, format!("{dir:?} is not an absolute path")));
    }
    Ok(dir.to_owned())
}

/// Who the process runs as: numeric ids go into the spec, a user name and
/// a group to the agent (which resolves them in the container's
/// /etc/passwd and /etc/group).
#[derive(Debug, PartialEq, Eq)]
pub(super) struct ProcessUser {
    pub uid: u32,
    pub gid: u32,
    pub username: Option<String>,
    /// A numeric uid without a group: the agent takes the gid from the
    /// uid's entry in the container's /etc/passwd (`gid`, 0, without one).
    pub gid_from_passwd: bool,
    /// The primary group the agent sets after the user is known: a group
    /// name, or the decimal gid that goes with a user name.
    pub group: Option<String>,
    pub additional_gids: Vec<u32>,
    /// SupplementalGroupsPolicy Strict: `additional_gids` only, without
    /// the user's /etc/group memberships.
    pub strict_groups: bool,
}

/// One side of a `user[:group]` string.
#[derive(Debug, PartialEq, Eq)]
enum Id {
    Number(u32),
    Name(String),
}

fn parse_id(field: &str, s: &str) -> Result<Id, SpecError> {
    if s.is_empty() || s.contains(['\0', '/', ':']) {
        return Err(invalid(field, format!("{s:?} is not a user or group")));
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse()
            .map(Id::Number)
            .map_err(|_| invalid(field, format!("id {s} is out of range")));
    }
    Ok(Id::Name(s.to_owned()))
}

fn id_from_i64(field: &str, value: i64) -> Result<u32, SpecError> {
    u32::try_from(value).map_err(|_| invalid(field, format!("id {value} is out of range")))
}

pub(super) fn user(
    sc: &cri::LinuxContainerSecurityContext,
    image: &ImageConfig,
) -> Result<ProcessUser, SpecError> {
    const USERNAME: &str = "linux.security_context.run_as_username";
    const UID: &str = "linux.security_context.run_as_user";
    const GID: &str = "linux.security_context.run_as_group";
    const IMAGE: &str = "image config User";
    let run_as_group = sc
        .run_as_group
        .as_ref()
        .map(|g| id_from_i64(GID, g.value).map(Id::Number))
        .transpose()?;
    // containerd's order: the CRI user name, the CRI uid, the image's User.
    let (user, group) = if !sc.run_as_username.is_empty() {
        if sc.run_as_user.is_some() {
            return Err(invalid(
                USERNAME,
                "run_as_user and run_as_username are mutually exclusive",
            ));
        }
        (parse_id(USERNAME, &sc.run_as_username)?, run_as_group)
    } else if let Some(uid) = &sc.run_as_user {
        (Id::Number(id_from_i64(UID, uid.value)?), run_as_group)
    } else if run_as_group.is_some() {
        return Err(invalid(GID, "needs run_as_user or run_as_username"));
    } else if image.user.is_empty() {
        // No user at all is root with gid 0, looked up nowhere.
        (Id::Number(0), Some(Id::Number(0)))
    } else {
        match image.user.split_once(':') {
            Some((u, g)) => (parse_id(IMAGE, u)?, Some(parse_id(IMAGE, g)?)),
            None => (parse_id(IMAGE, &image.user)?, None),
        }
    };
    // A numeric uid alone takes the gid of its /etc/passwd entry, 0 without
    // one (containerd's `WithUserID`); the agent reads the container's
    // passwd, which the host must not (its symlinks are the image's).
    // A named user's primary gid comes from the container's /etc/passwd,
    // so a group beside it is the agent's to set, and a group name always
    // is (in its /etc/group).
    let (uid, gid, username, gid_from_passwd, group) = match (user, group) {
        (Id::Number(uid), None) => (uid, 0, None, true, None),
        (Id::Number(uid), Some(Id::Number(gid))) => (uid, gid, None, false, None),
        (Id::Name(name), None) => (0, 0, Some(name), false, None),
        (Id::Name(name), Some(Id::Number(gid))) => {
            (0, gid, Some(name), false, Some(gid.to_string()))
        }
        (Id::Number(uid), Some(Id::Name(group))) => (uid, 0, None, false, Some(group)),
        (Id::Name(name), Some(Id::Name(group))) => (0, 0, Some(name), false, Some(group)),
    };
    let strict_groups = match cri::SupplementalGroupsPolicy::try_from(sc.supplemental_groups_policy)
    {
        Ok(cri::SupplementalGroupsPolicy::Merge) => false,
        Ok(cri::SupplementalGroupsPolicy::Strict) => true,
        Err(_) => {
            return Err(invalid(
                "linux.security_context.supplemental_groups_policy",
                format!("unknown policy {}", sc.supplemental_groups_policy),
            ))
        }
    };
    let mut additional_gids = BTreeSet::new();
    for g in &sc.supplemental_groups {
        additional_gids.insert(id_from_i64(
            "linux.security_context.supplemental_groups",
            *g,
        )?);
    }
    Ok(ProcessUser {
        uid,
        gid,
        username,
        gid_from_passwd,
        group,
        additional_gids: additional_gids.into_iter().collect(),
        strict_groups,
    })
}

/// The capability sets of the process.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Caps {
    /// Bounding, effective and permitted.
    pub bounding: BTreeSet<&'static str>,
    /// Ambient and inheritable.
    pub ambient: BTreeSet<&'static str>,
}

/// `CAP_X` for a CRI name (`X`, case-insensitive; a `CAP_` prefix is
/// accepted too), or None for a capability the guest kernel does not know.
fn capability(name: &str) -> Option<&'static str> {
    let upper = name.to_ascii_uppercase();
    let full = if upper.starts_with("CAP_") {
        upper
    } else {
        format!("CAP_{upper}")
    };
    ALL_CAPABILITIES.iter().copied().find(|c| *c == full)
}

pub(super) fn capabilities(sc: &cri::LinuxContainerSecurityContext) -> Result<Caps, SpecError> {
    const FIELD: &str = "linux.security_context.capabilities";
    if sc.privileged {
        return Ok(Caps {
            bounding: ALL_CAPABILITIES.into_iter().collect(),
            ambient: BTreeSet::new(),
        });
    }
    let mut set: BTreeSet<&'static str> = DEFAULT_CAPABILITIES.into_iter().collect();
    let mut ambient = BTreeSet::new();
    let Some(c) = &sc.capabilities else {
        return Ok(Caps {
            bounding: set,
            ambient,
        });
    };
    let is_all = |n: &String| n.eq_ignore_ascii_case("ALL");
    if c.add_capabilities.iter().any(is_all) {
        set = ALL_CAPABILITIES.into_iter().collect();
    }
    if c.drop_capabilities.iter().any(is_all) {
        set.clear();
    }
    for name in c.add_capabilities.iter().filter(|n| !is_all(n)) {
        let cap = capability(name).ok_or_else(|| {
            invalid(
                format!("{FIELD}.add_capabilities"),
                format!("unknown capability {name:?}"),
            )
        })?;
        set.insert(cap);
    }
    // Dropping a capability nobody knows leaves nothing to drop (as with
    // containerd, where it is a no-op too).
    for name in c.drop_capabilities.iter().filter(|n| !is_all(n)) {
        if let Some(cap) = capability(name) {
            set.remove(cap);
        }
    }
    for name in &c.add_ambient_capabilities {
        let field = format!("{FIELD}.add_ambient_capabilities");
        let cap = capability(name)
            .ok_or_else(|| invalid(&field, format!("unknown capability {name:?}")))?;
        if !set.contains(cap) {
            return Err(invalid(
                field,
                format!("{cap} is not among the container's capabilities (add it with add_capabilities)"),
            ));
        }
        ambient.insert(cap);
    }
    Ok(Caps {
        bounding: set,
        ambient,
    })
}
