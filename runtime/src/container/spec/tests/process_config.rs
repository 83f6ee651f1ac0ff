//! The container process: command, environment, working directory, user, terminal.

use super::*;

#[test]
fn command_and_args_follow_kubernetes() {
    let img = image();
    // Neither: the image's Entrypoint + Cmd.
    assert_eq!(args_for(&[], &[], &img).unwrap(), ["/entry", "image-cmd"]);
    // command replaces the Entrypoint, and the image's Cmd is dropped.
    assert_eq!(args_for(&["/bin/sh"], &[], &img).unwrap(), ["/bin/sh"]);
    // args alone replace Cmd, the Entrypoint stays.
    assert_eq!(args_for(&[], &["-x"], &img).unwrap(), ["/entry", "-x"]);
    // Both: exactly command + args.
    assert_eq!(
        args_for(&["/bin/sh"], &["-c", "true"], &img).unwrap(),
        ["/bin/sh", "-c", "true"]
    );
    // An Entrypoint of [""] counts as none.
    let blank = ImageConfig {
        entrypoint: vec![String::new()],
        ..image()
    };
    assert_eq!(args_for(&[], &[], &blank).unwrap(), ["image-cmd"]);
    let cmd_only = ImageConfig {
        entrypoint: Vec::new(),
        ..image()
    };
    assert_eq!(args_for(&[], &[], &cmd_only).unwrap(), ["image-cmd"]);
    assert_eq!(args_for(&[], &["x"], &cmd_only).unwrap(), ["x"]);
    // Nothing at all to run.
    let empty = ImageConfig::default();
    let err = args_for(&[], &[], &empty).unwrap_err();
    assert!(err.starts_with("command: no command specified"), "{err}");
    assert!(args_for(&[""], &[], &empty).is_err());
    assert!(args_for(&["a\0b"], &[], &empty).is_err());
    // And it lands in the spec.
    let spec = spec_for(&config(), &img);
    assert_eq!(strings(&spec["process"]["args"]), ["/entry", "image-cmd"]);
}

#[test]
fn environment_is_path_hostname_image_then_cri() {
    let c = cri::ContainerConfig {
        envs: vec![
            KeyValue {
                key: "FROM_IMAGE".into(),
                value: "2".into(),
            },
            KeyValue {
                key: "EXTRA".into(),
                value: "a=b".into(),
            },
        ],
        ..config()
    };
    let img = ImageConfig {
        env: vec![
            "PATH=/image/bin".into(),
            "FROM_IMAGE=1".into(),
            "GONE=x".into(),
            "GONE".into(),
        ],
        ..image()
    };
    let spec = spec_for(&c, &img);
    assert_eq!(
        strings(&spec["process"]["env"]),
        [
            "PATH=/image/bin",
            "HOSTNAME=pod-a",
            "FROM_IMAGE=2",
            "EXTRA=a=b"
        ]
    );
    // Without an image PATH, the default one.
    let env = environment(&config(), &ImageConfig::default(), "").unwrap();
    assert_eq!(env, [format!("PATH={DEFAULT_PATH}")]);
    // CRI may override PATH and HOSTNAME too.
    let c = cri::ContainerConfig {
        envs: vec![KeyValue {
            key: "HOSTNAME".into(),
            value: "mine".into(),
        }],
        ..config()
    };
    let env = environment(&c, &image(), "pod-a").unwrap();
    assert!(env.contains(&"HOSTNAME=mine".to_owned()), "{env:?}");
}

#[test]
fn bad_environment_names_the_field() {
    for key in ["", "A=B", "tab\there", "caf\u{e9}"] {
        let c = cri::ContainerConfig {
            envs: vec![
                KeyValue {
                    key: "OK".into(),
                    value: String::new(),
                },
                KeyValue {
                    key: key.into(),
                    value: "v".into(),
                },
            ],
            ..config()
        };
        let err = error_for(&c, &image());
        assert!(err.starts_with("envs[1].key:"), "{err}");
    }
    let c = cri::ContainerConfig {
        envs: vec![KeyValue {
            key: "K".into(),
            value: "a\0b".into(),
        }],
        ..config()
    };
    assert!(error_for(&c, &image()).starts_with("envs[0].value:"));
    let img = ImageConfig {
        env: vec!["A=\0".into()],
        ..image()
    };
    assert!(error_for(&config(), &img).starts_with("image config Env:"));
    // Names Kubernetes allows beyond C identifiers are fine.
    assert!(valid_env_name("my.var-1"));
}

#[test]
fn working_directory() {
    let with_dir = |dir: &str| cri::ContainerConfig {
        working_dir: dir.into(),
        ..config()
    };
    let img = ImageConfig {
        working_dir: "/srv".into(),
        ..image()
    };
    assert_eq!(
        spec_for(&with_dir("/work"), &img)["process"]["cwd"],
        "/work"
    );
    assert_eq!(spec_for(&config(), &img)["process"]["cwd"], "/srv");
    assert_eq!(spec_for(&config(), &image())["process"]["cwd"], "/");
    assert!(error_for(&with_dir("rel"), &img).starts_with("working_dir:"));
    let rel = ImageConfig {
        working_dir: "srv".into(),
        ..image()
    };
    assert!(error_for(&config(), &rel).starts_with("image config WorkingDir:"));
}

fn user_of(c: &cri::ContainerConfig, image_user: &str) -> Result<ProcessUser, String> {
    let sc = c
        .linux
        .as_ref()
        .and_then(|l| l.security_context.clone())
        .unwrap_or_default();
    let img = ImageConfig {
        user: image_user.into(),
        ..image()
    };
    process::user(&sc, &img).map_err(|e| e.to_string())
}

fn ids(uid: u32, gid: u32, username: Option<&str>) -> ProcessUser {
    ProcessUser {
        uid,
        gid,
        username: username.map(str::to_owned),
        gid_from_passwd: false,
        group: None,
        additional_gids: Vec::new(),
        strict_groups: false,
    }
}

/// `ids` with a group for the agent to set.
fn with_group(user: ProcessUser, group: &str) -> ProcessUser {
    ProcessUser {
        group: Some(group.into()),
        ..user
    }
}

/// A numeric uid without a group: the agent takes the gid from passwd.
fn uid_only(uid: u32) -> ProcessUser {
    ProcessUser {
        gid_from_passwd: true,
        ..ids(uid, 0, None)
    }
}

#[test]
fn image_user_strings() {
    let c = config();
    assert_eq!(user_of(&c, "").unwrap(), ids(0, 0, None));
    assert_eq!(user_of(&c, "1000").unwrap(), uid_only(1000));
    assert_eq!(user_of(&c, "0").unwrap(), uid_only(0));
    assert_eq!(user_of(&c, "1000:2000").unwrap(), ids(1000, 2000, None));
    assert_eq!(user_of(&c, "nginx").unwrap(), ids(0, 0, Some("nginx")));
    // A group beside a user name, or a group name: the agent sets it.
    assert_eq!(
        user_of(&c, "nginx:101").unwrap(),
        with_group(ids(0, 101, Some("nginx")), "101")
    );
    assert_eq!(
        user_of(&c, "1000:staff").unwrap(),
        with_group(ids(1000, 0, None), "staff")
    );
    assert_eq!(
        user_of(&c, "app:staff").unwrap(),
        with_group(ids(0, 0, Some("app")), "staff")
    );
    for bad in [":1", "1:", "4294967296", "a/b", "1:2:3"] {
        assert!(
            user_of(&c, bad)
                .unwrap_err()
                .starts_with("image config User:"),
            "{bad}"
        );
    }
}

#[test]
fn cri_user_overrides_the_image() {
    let c = with_sc(|sc| sc.run_as_user = Some(Int64Value { value: 1001 }));
    // The image's group goes with the image's user.
    assert_eq!(user_of(&c, "nginx:101").unwrap(), uid_only(1001));
    let c = with_sc(|sc| {
        sc.run_as_user = Some(Int64Value { value: 1001 });
        sc.run_as_group = Some(Int64Value { value: 3000 });
        sc.supplemental_groups = vec![5, 4, 5];
    });
    let u = user_of(&c, "").unwrap();
    assert_eq!((u.uid, u.gid, u.additional_gids), (1001, 3000, vec![4, 5]));
    let c = with_sc(|sc| sc.run_as_username = "app".into());
    assert_eq!(user_of(&c, "1000").unwrap(), ids(0, 0, Some("app")));
    let c = with_sc(|sc| {
        sc.run_as_username = "app".into();
        sc.run_as_group = Some(Int64Value { value: 3000 });
    });
    assert_eq!(
        user_of(&c, "").unwrap(),
        with_group(ids(0, 3000, Some("app")), "3000")
    );

    let c = with_sc(|sc| sc.run_as_group = Some(Int64Value { value: 3000 }));
    let err = user_of(&c, "1000").unwrap_err();
    assert!(
        err.starts_with("linux.security_context.run_as_group: needs run_as_user"),
        "{err}"
    );
    let c = with_sc(|sc| {
        sc.run_as_user = Some(Int64Value { value: 1 });
        sc.run_as_username = "app".into();
    });
    assert!(user_of(&c, "").unwrap_err().contains("mutually exclusive"));
    let c = with_sc(|sc| sc.run_as_user = Some(Int64Value { value: -1 }));
    assert!(user_of(&c, "")
        .unwrap_err()
        .starts_with("linux.security_context.run_as_user:"));
    let c = with_sc(|sc| sc.supplemental_groups = vec![1 << 40]);
    assert!(user_of(&c, "")
        .unwrap_err()
        .starts_with("linux.security_context.supplemental_groups:"));
    let c = with_sc(|sc| {
        sc.run_as_user = Some(Int64Value { value: 1001 });
        sc.supplemental_groups = vec![7];
        sc.supplemental_groups_policy = cri::SupplementalGroupsPolicy::Strict as i32;
    });
    let u = user_of(&c, "").unwrap();
    assert!(u.strict_groups && u.additional_gids == [7], "{u:?}");
    let (req, _) = request(&input(&c, &image()));
    assert!(req.strict_supplemental_groups);
    let (req, _) = request(&input(&config(), &image()));
    assert!(!req.strict_supplemental_groups);
    let c = with_sc(|sc| sc.supplemental_groups_policy = 7);
    assert!(user_of(&c, "")
        .unwrap_err()
        .starts_with("linux.security_context.supplemental_groups_policy: unknown policy 7"));
}

#[test]
fn user_lands_in_spec_and_request() {
    let c = with_sc(|sc| {
        sc.run_as_user = Some(Int64Value { value: 1001 });
        sc.run_as_group = Some(Int64Value { value: 3000 });
        sc.supplemental_groups = vec![7];
    });
    let (req, spec) = request(&input(&c, &image()));
    assert_eq!(
        spec["process"]["user"],
        json!({"uid": 1001, "gid": 3000, "additionalGids": [7]})
    );
    assert_eq!(req.username, "");
    assert!(!req.gid_from_passwd);
    let img = ImageConfig {
        user: "nginx".into(),
        ..image()
    };
    let (req, spec) = request(&input(&config(), &img));
    assert_eq!(req.username, "nginx");
    assert!(!req.gid_from_passwd);
    assert_eq!(req.group, "");
    assert_eq!(spec["process"]["user"]["uid"], 0);
    let img = ImageConfig {
        user: "nginx:www".into(),
        ..image()
    };
    let (req, _) = request(&input(&config(), &img));
    assert_eq!(
        (req.username.as_str(), req.group.as_str()),
        ("nginx", "www")
    );

    // A uid alone: gid 0 in the spec, and the agent asked to replace it
    // with the gid of the uid's /etc/passwd entry.
    let c = with_sc(|sc| sc.run_as_user = Some(Int64Value { value: 1234 }));
    let (req, spec) = request(&input(&c, &image()));
    assert_eq!(
        spec["process"]["user"],
        json!({"uid": 1234, "gid": 0, "additionalGids": []})
    );
    assert_eq!(req.username, "");
    assert!(req.gid_from_passwd);
    // No user anywhere: root with gid 0, nothing to look up.
    let (req, spec) = request(&input(&config(), &image()));
    assert_eq!(
        spec["process"]["user"],
        json!({"uid": 0, "gid": 0, "additionalGids": []})
    );
    assert!(!req.gid_from_passwd);
}

#[test]
fn tty_and_stdin() {
    let c = cri::ContainerConfig {
        tty: true,
        stdin: true,
        ..config()
    };
    let (req, spec) = request(&input(&c, &image()));
    assert!(req.stdin);
    assert_eq!(spec["process"]["terminal"], true);
}
