//! Capabilities, privileged containers, seccomp profiles.

use super::*;

fn caps_of(add: &[&str], drop: &[&str]) -> Result<BTreeSet<&'static str>, String> {
    let c = with_sc(|sc| {
        sc.capabilities = Some(Capability {
            add_capabilities: add.iter().map(|s| s.to_string()).collect(),
            drop_capabilities: drop.iter().map(|s| s.to_string()).collect(),
            add_ambient_capabilities: Vec::new(),
        })
    });
    let sc = c.linux.unwrap().security_context.unwrap();
    capabilities(&sc)
        .map(|c| c.bounding)
        .map_err(|e| e.to_string())
}

#[test]
fn capabilities_add_and_drop() {
    let defaults: BTreeSet<&str> = DEFAULT_CAPABILITIES.into_iter().collect();
    assert_eq!(caps_of(&[], &[]).unwrap(), defaults);
    let more = caps_of(&["NET_ADMIN", "cap_sys_time"], &["NET_RAW", "mknod"]).unwrap();
    assert!(more.contains("CAP_NET_ADMIN") && more.contains("CAP_SYS_TIME"));
    assert!(!more.contains("CAP_NET_RAW") && !more.contains("CAP_MKNOD"));
    assert_eq!(more.len(), 14);
    // drop ALL, then add back one.
    let one = caps_of(&["NET_BIND_SERVICE"], &["ALL"]).unwrap();
    assert_eq!(
        one.into_iter().collect::<Vec<_>>(),
        ["CAP_NET_BIND_SERVICE"]
    );
    // add ALL, drop one.
    let all_but = caps_of(&["all"], &["CHOWN"]).unwrap();
    assert_eq!(all_but.len(), ALL_CAPABILITIES.len() - 1);
    assert!(!all_but.contains("CAP_CHOWN"));
    // Both ALL: none (drop wins, as in containerd).
    assert!(caps_of(&["ALL"], &["ALL"]).unwrap().is_empty());
    // Unknown: an error to add, nothing to drop.
    let err = caps_of(&["NET_WIZARD"], &[]).unwrap_err();
    assert!(
        err.starts_with("linux.security_context.capabilities.add_capabilities: unknown capability"),
        "{err}"
    );
    assert_eq!(caps_of(&[], &["NET_WIZARD"]).unwrap(), defaults);
}

#[test]
fn capability_sets_in_the_spec() {
    let c = with_sc(|sc| {
        sc.capabilities = Some(Capability {
            add_capabilities: vec!["NET_ADMIN".into()],
            drop_capabilities: Vec::new(),
            add_ambient_capabilities: vec!["NET_ADMIN".into()],
        })
    });
    let spec = spec_for(&c, &image());
    let caps = &spec["process"]["capabilities"];
    let bounding: BTreeSet<String> = strings(&caps["bounding"]).into_iter().collect();
    assert_eq!(bounding.len(), 15);
    for set in ["effective", "permitted"] {
        let s: BTreeSet<String> = strings(&caps[set]).into_iter().collect();
        assert_eq!(s, bounding, "{set}");
    }
    assert_eq!(strings(&caps["ambient"]), ["CAP_NET_ADMIN"]);
    assert_eq!(strings(&caps["inheritable"]), ["CAP_NET_ADMIN"]);
    // Plain containers: no inheritable or ambient capabilities.
    let spec = spec_for(&config(), &image());
    assert!(strings(&spec["process"]["capabilities"]["inheritable"]).is_empty());
    assert!(strings(&spec["process"]["capabilities"]["ambient"]).is_empty());
    // Ambient needs the capability in the set.
    let c = with_sc(|sc| {
        sc.capabilities = Some(Capability {
            add_ambient_capabilities: vec!["SYS_ADMIN".into()],
            ..Default::default()
        })
    });
    let err = error_for(&c, &image());
    assert!(
        err.contains("add_ambient_capabilities: CAP_SYS_ADMIN is not among"),
        "{err}"
    );
}

#[test]
fn privileged_gets_everything_and_no_confinement() {
    let c = with_sc(|sc| {
        sc.privileged = true;
        sc.capabilities = Some(Capability {
            drop_capabilities: vec!["ALL".into()],
            ..Default::default()
        });
        sc.seccomp = Some(cri::SecurityProfile {
            profile_type: cri::security_profile::ProfileType::RuntimeDefault as i32,
            localhost_ref: String::new(),
        });
        sc.masked_paths = vec!["/proc/kcore".into()];
    });
    let spec = spec_for(&c, &image());
    assert_eq!(
        strings(&spec["process"]["capabilities"]["bounding"]).len(),
        ALL_CAPABILITIES.len()
    );
    let linux = &spec["linux"];
    assert!(linux.get("seccomp").is_none());
    assert!(linux.get("maskedPaths").is_none());
    assert!(linux.get("readonlyPaths").is_none());
    assert!(linux.get("namespaces").is_none());
    let mount = |dest: &str| {
        spec["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == dest)
            .cloned()
            .unwrap()
    };
    assert!(strings(&mount("/sys")["options"]).contains(&"rw".to_owned()));
    assert!(strings(&mount("/sys/fs/cgroup")["options"]).contains(&"rw".to_owned()));
}

#[test]
fn confined_by_default() {
    let spec = spec_for(&config(), &image());
    let linux = &spec["linux"];
    assert_eq!(strings(&linux["maskedPaths"]), DEFAULT_MASKED_PATHS);
    assert_eq!(strings(&linux["readonlyPaths"]), DEFAULT_READONLY_PATHS);
    assert_eq!(linux["namespaces"], json!([{"type": "cgroup"}]));
    // No seccomp unless asked (containerd's default).
    assert!(linux.get("seccomp").is_none());
    assert_eq!(spec["process"]["noNewPrivileges"], false);
    assert_eq!(
        spec["process"]["rlimits"],
        json!([{"type": "RLIMIT_NOFILE", "soft": NOFILE_LIMIT, "hard": NOFILE_LIMIT}])
    );
    // CRI's lists win when given; no_new_privs is passed on.
    let c = with_sc(|sc| {
        sc.masked_paths = vec!["/proc/kcore".into()];
        sc.readonly_paths = vec!["/proc/sys/".into()];
        sc.no_new_privs = true;
    });
    let spec = spec_for(&c, &image());
    assert_eq!(strings(&spec["linux"]["maskedPaths"]), ["/proc/kcore"]);
    assert_eq!(strings(&spec["linux"]["readonlyPaths"]), ["/proc/sys"]);
    assert_eq!(spec["process"]["noNewPrivileges"], true);
    let c = with_sc(|sc| sc.masked_paths = vec!["proc".into()]);
    assert!(error_for(&c, &image()).starts_with("linux.security_context.masked_paths:"));
}

#[test]
#[allow(deprecated)] // seccomp_profile_path, still honoured
fn seccomp_choices() {
    use cri::security_profile::ProfileType;
    let seccomp_of =
        |c: &cri::ContainerConfig| spec_for(c, &image())["linux"].get("seccomp").cloned();
    let typed = |t: ProfileType, r: &str| {
        with_sc(|sc| {
            sc.seccomp = Some(cri::SecurityProfile {
                profile_type: t as i32,
                localhost_ref: r.into(),
            })
        })
    };
    let default = seccomp_of(&typed(ProfileType::RuntimeDefault, "")).unwrap();
    assert_eq!(default["defaultAction"], "SCMP_ACT_ALLOW");
    assert!(seccomp_of(&typed(ProfileType::Unconfined, "")).is_none());
    // The deprecated strings, when `seccomp` is unset.
    let by_path = |p: &str| with_sc(|sc| sc.seccomp_profile_path = p.into());
    assert_eq!(seccomp_of(&by_path("runtime/default")).unwrap(), default);
    assert!(seccomp_of(&by_path("unconfined")).is_none());
    assert!(seccomp_of(&by_path("")).is_none());
    let err = error_for(&by_path("fancy"), &image());
    assert!(
        err.starts_with("linux.security_context.seccomp_profile_path:"),
        "{err}"
    );
    // `seccomp` wins over the deprecated string.
    let both = with_sc(|sc| {
        sc.seccomp = Some(cri::SecurityProfile {
            profile_type: ProfileType::Unconfined as i32,
            localhost_ref: String::new(),
        });
        sc.seccomp_profile_path = "runtime/default".into();
    });
    assert!(seccomp_of(&both).is_none());
    // Localhost needs an absolute path that exists.
    let err = error_for(&typed(ProfileType::Localhost, ""), &image());
    assert!(
        err.starts_with("linux.security_context.seccomp.localhost_ref:"),
        "{err}"
    );
    let err = error_for(
        &typed(ProfileType::Localhost, "/nonexistent/profile.json"),
        &image(),
    );
    assert!(
        err.starts_with("seccomp profile /nonexistent/profile.json: cannot read it"),
        "{err}"
    );
    assert!(error_for(&by_path("localhost/relative.json"), &image()).contains("not absolute"));
}

#[test]
fn seccomp_localhost_profile_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("profile.json");
    std::fs::write(
        &path,
        r#"{"defaultAction":"SCMP_ACT_ERRNO","defaultErrnoRet":1,
            "archMap":[{"architecture":"SCMP_ARCH_X86_64","subArchitectures":["SCMP_ARCH_X86","SCMP_ARCH_X32"]},
                       {"architecture":"SCMP_ARCH_AARCH64","subArchitectures":["SCMP_ARCH_ARM"]}],
            "syscalls":[
              {"names":["read","write","exit_group"],"action":"SCMP_ACT_ALLOW","comment":"basics"},
              {"name":"personality","action":"SCMP_ACT_ALLOW","args":[{"index":0,"value":8,"op":"SCMP_CMP_EQ"}]},
              {"names":["mount"],"action":"SCMP_ACT_ALLOW","includes":{"caps":["CAP_SYS_ADMIN"]}},
              {"names":["clone3"],"action":"SCMP_ACT_ERRNO","errnoRet":38,"excludes":{"caps":["CAP_SYS_ADMIN"]}},
              {"names":["ptrace"],"action":"SCMP_ACT_ALLOW","includes":{"minKernel":"4.8"}},
              {"names":["arm_fadvise64_64"],"action":"SCMP_ACT_ALLOW","includes":{"arches":["arm","arm64"]}},
              {"names":["future_call"],"action":"SCMP_ACT_ALLOW","includes":{"minKernel":"99.0"}}
            ]}"#,
    )
    .unwrap();
    let profile_for = |add: &[&str]| {
        let c = with_sc(|sc| {
            sc.seccomp = Some(cri::SecurityProfile {
                profile_type: cri::security_profile::ProfileType::Localhost as i32,
                localhost_ref: path.to_str().unwrap().into(),
            });
            sc.capabilities = Some(Capability {
                add_capabilities: add.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            });
        });
        spec_for(&c, &image())["linux"]["seccomp"].clone()
    };
    let p = profile_for(&[]);
    assert_eq!(p["defaultAction"], "SCMP_ACT_ERRNO");
    assert_eq!(p["defaultErrnoRet"], 1);
    assert_eq!(
        strings(&p["architectures"]),
        ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    );
    let names: Vec<Vec<String>> = p["syscalls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| strings(&s["names"]))
        .collect();
    assert_eq!(
        names,
        [
            vec!["read", "write", "exit_group"],
            vec!["personality"],
            vec!["clone3"],
            vec!["ptrace"]
        ]
    );
    assert_eq!(p["syscalls"][1]["args"][0]["value"], 8);
    assert_eq!(p["syscalls"][2]["errnoRet"], 38);
    // With CAP_SYS_ADMIN: mount allowed, clone3's ENOSYS gone.
    let admin = profile_for(&["SYS_ADMIN"]);
    let names: Vec<String> = admin["syscalls"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| strings(&s["names"]))
        .collect();
    assert!(names.contains(&"mount".to_owned()) && !names.contains(&"clone3".to_owned()));
}

#[test]
#[allow(deprecated)] // seccomp_profile_path, still honoured
fn seccomp_localhost_bad_profiles() {
    let dir = tempfile::tempdir().unwrap();
    let check = |text: &str, want: &str| {
        let path = dir.path().join("p.json");
        std::fs::write(&path, text).unwrap();
        let c = with_sc(|sc| {
            sc.seccomp_profile_path = format!("localhost/{}", path.display());
        });
        let err = error_for(&c, &image());
        assert!(err.contains(want), "{text}: {err}");
    };
    check("{not json", "not a seccomp profile");
    check(r#"{"syscalls":[]}"#, "not a seccomp profile");
    check(r#"{"defaultAction":"SCMP_ACT_MAYBE"}"#, "SCMP_ACT_MAYBE");
    check(
        r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["x"],"action":"SCMP_ACT_ERRNO","args":[{"index":0,"value":1,"op":"SCMP_CMP_SIMILAR"}]}]}"#,
        "SCMP_CMP_SIMILAR",
    );
    check(
        r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"action":"SCMP_ACT_ERRNO"}]}"#,
        "names no syscall",
    );
    check(
        r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["x"],"action":"SCMP_ACT_NOTIFY"}]}"#,
        "SCMP_ACT_NOTIFY) is not supported",
    );
    check(
        r#"{"defaultAction":"SCMP_ACT_ALLOW","listenerPath":"/run/agent.sock"}"#,
        "listenerPath",
    );
}
