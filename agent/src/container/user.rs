//! Users and groups from the container's own `/etc/passwd` and `/etc/group`
//! (what `run_as_username` and the user's supplementary groups mean).

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Errors resolving a user.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("user {0:?} not found in the container's /etc/passwd")]
    NotFound(String),
    #[error("group {0:?} not found in the container's /etc/group")]
    GroupNotFound(String),
    #[error("cannot read the container's {path}: {source}")]
    Read {
        path: &'static str,
        source: std::io::Error,
    },
}

/// One `/etc/passwd` entry (the fields we use).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

/// Parses `/etc/passwd` text; malformed lines are skipped, as libc does.
pub fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 7 {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_owned(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_owned(),
            })
        })
        .collect()
}

/// The gid of the group called `name` in `/etc/group` text.
pub fn group_gid(text: &str, name: &str) -> Option<u32> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            (f.len() >= 3 && f[0] == name).then(|| f[2].parse().ok())?
        })
}

/// The gids of the groups in `/etc/group` text that list `user` as a member.
pub fn member_gids(text: &str, user: &str) -> Vec<u32> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 4 {
                return None;
            }
            let gid = f[2].parse().ok()?;
            f[3].split(',').any(|m| m.trim() == user).then_some(gid)
        })
        .collect()
}

/// Reads a file of the container's root (`root` is usually `/` after
/// pivot_root); a missing file reads as empty, as for images without one.
fn read_optional(root: &Path, path: &'static str) -> Result<String, UserError> {
    match std::fs::read_to_string(root.join(path.trim_start_matches('/'))) {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(source) => Err(UserError::Read { path, source }),
    }
}

/// The real uid, real gid and supplementary groups in a
/// `/proc/<pid>/status` text.
pub fn identity_in_status(status: &str) -> Option<(u32, u32, Vec<u32>)> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    let first = |name: &str| field(name)?.split_whitespace().next()?.parse().ok();
    let groups = field("Groups")?
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    Some((first("Uid")?, first("Gid")?, groups))
}

/// What the process runs as, after resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups: the requested ones, then the user's memberships.
    pub groups: Vec<u32>,
    /// The user's home directory, when /etc/passwd knows the user.
    pub home: Option<String>,
}

/// What decides the process's uid and primary gid, besides the numeric
/// ids of its OCI `process.user`: a request's `username`,
/// `gid_from_passwd` and `group`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserSource {
    pub user: UserKind,
    /// A decimal gid or a group name of the container's /etc/group: the
    /// primary gid, whatever `user` gave.
    pub group: Option<String>,
    /// Only the requested supplementary groups, not the user's
    /// memberships in /etc/group (CRI SupplementalGroupsPolicy Strict).
    pub strict_groups: bool,
}

/// How the uid (and a first primary gid) are found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum UserKind {
    /// `process.user.uid` and `gid` as given.
    #[default]
    Ids,
    /// `process.user.uid`, with the primary gid of its /etc/passwd entry
    /// (`process.user.gid` when it has none): containerd's rule for a
    /// numeric user without a group.
    UidWithPasswdGid,
    /// A user name that must exist in /etc/passwd: its uid and primary gid.
    Name(String),
}

impl UserSource {
    /// From a request's `username` (empty: none), `gid_from_passwd` and
    /// `group` (empty: none); a name already brings its primary gid.
    pub fn from_request(
        username: &str,
        gid_from_passwd: bool,
        group: &str,
        strict_groups: bool,
    ) -> UserSource {
        let user = if !username.is_empty() {
            UserKind::Name(username.to_owned())
        } else if gid_from_passwd {
            UserKind::UidWithPasswdGid
        } else {
            UserKind::Ids
        };
        UserSource {
            user,
            group: (!group.is_empty()).then(|| group.to_owned()),
            strict_groups,
        }
    }
}

/// Resolves the process's user after `source`. Whatever decides the ids,
/// the passwd entry of the final uid (if any) gives the home directory and
/// the group memberships, as runc does.
pub fn resolve(
    root: &Path,
    source: &UserSource,
    uid: u32,
    gid: u32,
    additional_gids: &[u32],
) -> Result<ResolvedUser, UserError> {
    let passwd = parse_passwd(&read_optional(root, "/etc/passwd")?);
    let entry = match &source.user {
        UserKind::Name(name) => Some(
            passwd
                .iter()
                .find(|e| &e.name == name)
                .ok_or_else(|| UserError::NotFound(name.clone()))?,
        ),
        UserKind::Ids | UserKind::UidWithPasswdGid => passwd.iter().find(|e| e.uid == uid),
    };
    let (uid, mut gid) = match (&source.user, entry) {
        (UserKind::Name(_) | UserKind::UidWithPasswdGid, Some(e)) => (e.uid, e.gid),
        _ => (uid, gid),
    };
    let group_text = read_optional(root, "/etc/group")?;
    if let Some(group) = &source.group {
        gid = match group.parse() {
            Ok(number) => number,
            Err(_) => group_gid(&group_text, group)
                .ok_or_else(|| UserError::GroupNotFound(group.clone()))?,
        };
    }
    let mut groups = additional_gids.to_vec();
    if let Some(e) = entry.filter(|_| !source.strict_groups) {
        for g in member_gids(&group_text, &e.name) {
            if !groups.contains(&g) {
                groups.push(g);
            }
        }
    }
    Ok(ResolvedUser {
        uid,
        gid,
        groups,
        home: entry.map(|e| e.home.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        # comment\n\
        broken line\n\
        app:x:1000:1001:App:/home/app:/bin/sh\n\
        bad:x:notanumber:1:b:/:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nwheel:x:10:app,other\nstaff:x:50:other\ndocker:x:999: app \n";

    #[test]
    fn parses_passwd_skipping_malformed_lines() {
        let entries = parse_passwd(PASSWD);
        assert_eq!(entries.len(), 2);
        assert_eq!(
            entries[1],
            PasswdEntry {
                name: "app".into(),
                uid: 1000,
                gid: 1001,
                home: "/home/app".into()
            }
        );
    }

    #[test]
    fn identity_from_proc_status() {
        let status = "Name:\tsleep\nUid:\t1000\t1000\t1000\t1000\n\
                      Gid:\t50\t50\t50\t50\nFDSize:\t64\nGroups:\t5 10 999 \n";
        assert_eq!(
            identity_in_status(status),
            Some((1000, 50, vec![5, 10, 999]))
        );
        let none = "Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t\n";
        assert_eq!(identity_in_status(none), Some((0, 0, vec![])));
        assert_eq!(identity_in_status("Uid:\tx\nGid:\t0\nGroups:\n"), None);
        assert_eq!(identity_in_status(""), None);
    }

    #[test]
    fn finds_group_memberships() {
        assert_eq!(member_gids(GROUP, "app"), vec![10, 999]);
        assert_eq!(member_gids(GROUP, "nobody"), Vec::<u32>::new());
    }

    fn root_with(passwd: &str, group: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(dir.path().join("etc/passwd"), passwd).unwrap();
        std::fs::write(dir.path().join("etc/group"), group).unwrap();
        dir
    }

    fn name(n: &str) -> UserSource {
        UserSource {
            user: UserKind::Name(n.into()),
            ..Default::default()
        }
    }

    fn ids() -> UserSource {
        UserSource::default()
    }

    #[test]
    fn resolves_username_with_groups_and_home() {
        let root = root_with(PASSWD, GROUP);
        let user = resolve(root.path(), &name("app"), 0, 0, &[5]).unwrap();
        assert_eq!(
            user,
            ResolvedUser {
                uid: 1000,
                gid: 1001,
                groups: vec![5, 10, 999],
                home: Some("/home/app".into())
            }
        );
    }

    #[test]
    fn numeric_user_keeps_ids_and_finds_home() {
        let root = root_with(PASSWD, GROUP);
        let user = resolve(root.path(), &ids(), 1000, 7, &[]).unwrap();
        assert_eq!((user.uid, user.gid), (1000, 7));
        assert_eq!(user.home.as_deref(), Some("/home/app"));
        let unknown = resolve(root.path(), &ids(), 4242, 4242, &[]).unwrap();
        assert_eq!(unknown.home, None);
        assert!(unknown.groups.is_empty());
    }

    #[test]
    fn numeric_user_can_take_its_gid_from_passwd() {
        let root = root_with(PASSWD, GROUP);
        let source = UserSource {
            user: UserKind::UidWithPasswdGid,
            ..Default::default()
        };
        let user = resolve(root.path(), &source, 1000, 0, &[5]).unwrap();
        assert_eq!(
            user,
            ResolvedUser {
                uid: 1000,
                gid: 1001,
                groups: vec![5, 10, 999],
                home: Some("/home/app".into())
            }
        );
        // No entry for the uid, or no /etc/passwd at all: the given gid.
        let unknown = resolve(root.path(), &source, 4242, 0, &[]).unwrap();
        assert_eq!((unknown.uid, unknown.gid), (4242, 0));
        assert!(unknown.groups.is_empty());
        let empty = tempfile::tempdir().unwrap();
        let bare = resolve(empty.path(), &source, 1000, 0, &[]).unwrap();
        assert_eq!((bare.uid, bare.gid, bare.home), (1000, 0, None));
    }

    #[test]
    fn user_source_from_a_request() {
        let kind = |s: UserSource| s.user;
        assert_eq!(
            kind(UserSource::from_request("", false, "", false)),
            UserKind::Ids
        );
        assert_eq!(
            kind(UserSource::from_request("", true, "", false)),
            UserKind::UidWithPasswdGid
        );
        for flag in [false, true] {
            assert_eq!(
                UserSource::from_request("app", flag, "", false),
                name("app")
            );
        }
        assert_eq!(UserSource::from_request("", false, "", false).group, None);
        assert_eq!(
            UserSource::from_request("app", false, "staff", false)
                .group
                .as_deref(),
            Some("staff")
        );
    }

    #[test]
    fn a_group_sets_the_primary_gid_by_name_or_number() {
        let root = root_with(PASSWD, GROUP);
        // user:group names: the group's gid, the user's memberships kept.
        let source = UserSource::from_request("app", false, "staff", false);
        let user = resolve(root.path(), &source, 0, 0, &[]).unwrap();
        assert_eq!((user.uid, user.gid, user.groups), (1000, 50, vec![10, 999]));
        // A name with a numeric group.
        let source = UserSource::from_request("app", false, "7", false);
        assert_eq!(resolve(root.path(), &source, 0, 0, &[]).unwrap().gid, 7);
        // A uid with a group name.
        let source = UserSource::from_request("", false, "wheel", false);
        let user = resolve(root.path(), &source, 4242, 0, &[]).unwrap();
        assert_eq!((user.uid, user.gid), (4242, 10));
        // An unknown group is an error naming it.
        let source = UserSource::from_request("app", false, "ghosts", false);
        let err = resolve(root.path(), &source, 0, 0, &[]).unwrap_err();
        assert!(
            matches!(&err, UserError::GroupNotFound(g) if g == "ghosts"),
            "{err}"
        );
        assert!(err.to_string().contains("/etc/group"), "{err}");
        assert_eq!(group_gid(GROUP, "docker"), Some(999));
        // Strict: the requested groups only, no memberships.
        let strict = UserSource::from_request("app", false, "", true);
        let user = resolve(root.path(), &strict, 0, 0, &[5]).unwrap();
        assert_eq!((user.uid, user.gid, user.groups), (1000, 1001, vec![5]));
        assert_eq!(group_gid("bad:x:nan:\n", "bad"), None);
    }

    #[test]
    fn unknown_username_is_an_error_naming_the_user() {
        let root = root_with(PASSWD, GROUP);
        let err = resolve(root.path(), &name("ghost"), 0, 0, &[]).unwrap_err();
        assert!(err.to_string().contains("\"ghost\""), "{err}");
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            resolve(empty.path(), &name("root"), 0, 0, &[]),
            Err(UserError::NotFound(_))
        ));
    }
}
