//! Tests of the spec builder: shared fixtures here, one file per concern.

mod mount_config;
mod namespaces_resources;
mod process_config;
mod security;

use super::process::{self, capabilities, environment, valid_env_name, ProcessUser};
use super::resources::resources;
use super::*;
use cri::{
    Capability, ContainerMetadata, Int64Value, KeyValue, LinuxContainerConfig,
    LinuxContainerResources, LinuxContainerSecurityContext, NamespaceOption,
};
use serde_json::Value;
use std::collections::BTreeSet;

fn image() -> ImageConfig {
    ImageConfig {
        entrypoint: vec!["/entry".into()],
        cmd: vec!["image-cmd".into()],
        env: vec!["PATH=/image/bin".into(), "FROM_IMAGE=1".into()],
        ..Default::default()
    }
}

fn config() -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: "app".into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: "sha256:abc".into(),
            user_specified_image: "docker.io/library/busybox:1".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn with_sc(f: impl FnOnce(&mut LinuxContainerSecurityContext)) -> cri::ContainerConfig {
    let mut sc = LinuxContainerSecurityContext::default();
    f(&mut sc);
    cri::ContainerConfig {
        linux: Some(LinuxContainerConfig {
            security_context: Some(sc),
            resources: None,
        }),
        ..config()
    }
}

fn input<'a>(config: &'a cri::ContainerConfig, image: &'a ImageConfig) -> SpecInput<'a> {
    SpecInput {
        container_id: "c1",
        config,
        image,
        root_path: "/run/carapace/rootfs/c1".into(),
        mounts: Vec::new(),
        sandbox_files: SandboxFiles::default(),
        pod_hostname: "pod-a".into(),
        pod_sysctls: BTreeMap::new(),
    }
}

/// What the agent does with the JSON first: parse it with oci-spec and
/// refuse a spec without args or root, with relative mount
/// destinations, or with a user namespace.
fn agent_accepts(json: &str) -> oci_spec::runtime::Spec {
    let spec: oci_spec::runtime::Spec = serde_json::from_str(json).expect("oci-spec parses it");
    let process = spec.process().as_ref().expect("process");
    assert!(process.args().as_ref().is_some_and(|a| !a.is_empty()));
    assert!(spec.root().is_some());
    for m in spec.mounts().iter().flatten() {
        assert!(m.destination().is_absolute(), "{m:?}");
    }
    let linux = spec.linux().as_ref().expect("linux");
    for ns in linux.namespaces().iter().flatten() {
        assert_ne!(ns.typ(), oci_spec::runtime::LinuxNamespaceType::User);
    }
    // Serializing again gives the same document.
    let again = serde_json::to_string(&spec).unwrap();
    let reparsed: oci_spec::runtime::Spec = serde_json::from_str(&again).unwrap();
    assert_eq!(reparsed, spec);
    spec
}

fn request(input: &SpecInput) -> (CreateContainerRequest, Value) {
    let req = agent_request(input).unwrap_or_else(|e| panic!("{e}"));
    agent_accepts(&req.oci_spec_json);
    let value = serde_json::from_str(&req.oci_spec_json).unwrap();
    (req, value)
}

fn spec_for(config: &cri::ContainerConfig, image: &ImageConfig) -> Value {
    request(&input(config, image)).1
}

fn error_for(config: &cri::ContainerConfig, image: &ImageConfig) -> String {
    agent_request(&input(config, image))
        .expect_err("should be refused")
        .to_string()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

fn args_for(command: &[&str], args: &[&str], image: &ImageConfig) -> Result<Vec<String>, String> {
    let c = cri::ContainerConfig {
        command: command.iter().map(|s| s.to_string()).collect(),
        args: args.iter().map(|s| s.to_string()).collect(),
        ..config()
    };
    process::args(&c, image).map_err(|e| e.to_string())
}

#[test]
fn basic_validation() {
    let c = config();
    let img = image();
    let mut inp = input(&c, &img);
    inp.container_id = "";
    assert!(agent_request(&inp)
        .unwrap_err()
        .to_string()
        .starts_with("container id:"));
    inp.container_id = "../x";
    assert!(agent_request(&inp)
        .unwrap_err()
        .to_string()
        .starts_with("container id:"));
    let mut inp = input(&c, &img);
    inp.pod_hostname = "bad name".into();
    assert!(agent_request(&inp)
        .unwrap_err()
        .to_string()
        .starts_with("sandbox config hostname:"));
    let mut inp = input(&c, &img);
    inp.root_path = String::new();
    assert!(agent_request(&inp)
        .unwrap_err()
        .to_string()
        .starts_with("root path:"));

    let nameless = cri::ContainerConfig {
        metadata: None,
        ..config()
    };
    assert_eq!(
        error_for(&nameless, &img),
        "metadata.name: must not be empty"
    );
    let devices = cri::ContainerConfig {
        devices: vec![cri::Device {
            container_path: "/dev/fuse".into(),
            host_path: "/dev/fuse".into(),
            permissions: "rwm".into(),
        }],
        ..config()
    };
    assert!(error_for(&devices, &img).starts_with("devices: host devices"));
}
