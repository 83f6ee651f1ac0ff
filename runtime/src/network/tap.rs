//! The VM's way onto the pod network (Kata's tc model): in the pod
//! namespace a tap device `tap0` for the VM's virtio-net, and tc `mirred`
//! filters on the ingress of both `eth0` (the CNI interface) and `tap0` that
//! redirect every frame to the other. The guest interface carries eth0's
//! MAC and addresses, so for the CNI plugin and the node nothing changed.
//!
//! `ip` and `tc` from iproute2 do the work: no maintained Rust crate
//! speaks tc, and these are a handful of commands per pod.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

use super::{NetworkError, POD_IFNAME};

/// The tap device QEMU attaches to, in the pod namespace.
pub const TAP_IFNAME: &str = "tap0";

/// What the VM's network device needs: its tap and eth0's MAC and MTU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmNetwork {
    /// The pod namespace, in which the VM process runs.
    pub netns: std::path::PathBuf,
    pub tap: String,
    pub mac: String,
    pub mtu: u32,
}

/// Creates `tap0` in the namespace with eth0's MTU and the redirections.
pub fn setup(netns: &Path) -> Result<VmNetwork, NetworkError> {
    add_tap(netns)?;
    connect(netns)
}

/// Creates `tap0` in the namespace, up, connected to nothing yet: a VM can
/// start on it before the pod's network exists (the warm pool), and
/// [`connect`] joins it to eth0 once CNI has made it.
pub fn add_tap(netns: &Path) -> Result<(), NetworkError> {
    run_steps(
        netns,
        &[
            (
                "ip",
                vec!["tuntap", "add", "dev", TAP_IFNAME, "mode", "tap"],
            ),
            ("ip", vec!["link", "set", "dev", TAP_IFNAME, "up"]),
        ],
    )
}

/// Joins `tap0` to the CNI interface eth0: eth0's MTU on the tap, frames
/// redirected both ways, eth0 up. Returns what the guest interface must
/// carry (eth0's MAC and MTU).
pub fn connect(netns: &Path) -> Result<VmNetwork, NetworkError> {
    let out = run(netns, "ip", &["-j", "link", "show", "dev", POD_IFNAME]);
    let (mac, mtu) = match out.and_then(|out| parse_link(&out)) {
        Ok(link) => link,
        Err(e) => {
            let _ = teardown(netns);
            return Err(e);
        }
    };
    let mtu_s = mtu.to_string();
    run_steps(
        netns,
        &[
            ("ip", vec!["link", "set", "dev", TAP_IFNAME, "mtu", &mtu_s]),
            ("tc", vec!["qdisc", "add", "dev", POD_IFNAME, "ingress"]),
            ("tc", redirect(POD_IFNAME, TAP_IFNAME)),
            ("tc", vec!["qdisc", "add", "dev", TAP_IFNAME, "ingress"]),
            ("tc", redirect(TAP_IFNAME, POD_IFNAME)),
            ("ip", vec!["link", "set", "dev", POD_IFNAME, "up"]),
        ],
    )?;
    Ok(VmNetwork {
        netns: netns.to_owned(),
        tap: TAP_IFNAME.into(),
        mac,
        mtu,
    })
}

/// Runs each step in the namespace; on the first failure, removes what
/// the steps made and returns the error.
fn run_steps(netns: &Path, steps: &[(&str, Vec<&str>)]) -> Result<(), NetworkError> {
    for (tool, args) in steps {
        if let Err(e) = run(netns, tool, args) {
            let _ = teardown(netns);
            return Err(e);
        }
    }
    Ok(())
}

/// Removes the tap and eth0's ingress qdisc (with its filter); what is
/// already gone is not an error. CNI DEL removes eth0 itself.
pub fn teardown(netns: &Path) -> Result<(), NetworkError> {
    if !netns.exists() {
        return Ok(());
    }
    let _ = run(netns, "tc", &["qdisc", "del", "dev", POD_IFNAME, "ingress"]);
    let _ = run(netns, "ip", &["link", "del", "dev", TAP_IFNAME]);
    Ok(())
}

/// A u32 match-all filter on `from`'s ingress that redirects to `to`.
fn redirect<'a>(from: &'a str, to: &'a str) -> Vec<&'a str> {
    vec![
        "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32", "match", "u8",
        "0", "0", "action", "mirred", "egress", "redirect", "dev", to,
    ]
}

/// MAC and MTU from `ip -j link show` output.
fn parse_link(json: &str) -> Result<(String, u32), NetworkError> {
    #[derive(Deserialize)]
    struct Link {
        address: String,
        mtu: u32,
    }
    let links: Vec<Link> = serde_json::from_str(json).map_err(|e| NetworkError::Command {
        what: format!("reading {POD_IFNAME}"),
        message: e.to_string(),
    })?;
    links
        .into_iter()
        .next()
        .map(|l| (l.address, l.mtu))
        .ok_or_else(|| NetworkError::Command {
            what: format!("reading {POD_IFNAME}"),
            message: "no such interface".into(),
        })
}

/// Runs `tool args` inside the namespace at `netns`; its stdout.
pub fn run(netns: &Path, tool: &str, args: &[&str]) -> Result<String, NetworkError> {
    let what = format!("{tool} {}", args.join(" "));
    let ns = std::fs::File::open(netns).map_err(|source| NetworkError::Io {
        what: format!("opening {}", netns.display()),
        source,
    })?;
    let mut command = Command::new(tool);
    command.args(args);
    // SAFETY: between fork and exec the child only calls setns(2), which
    // is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)
        });
    }
    let out = command.output().map_err(|source| NetworkError::Io {
        what: format!("running {tool}"),
        source,
    })?;
    if !out.status.success() {
        return Err(NetworkError::Command {
            what,
            message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_json_parses() {
        let (mac, mtu) = parse_link(
            r#"[{"ifindex":2,"ifname":"eth0","mtu":1450,"address":"0a:58:0a:f4:00:05"}]"#,
        )
        .unwrap();
        assert_eq!((mac.as_str(), mtu), ("0a:58:0a:f4:00:05", 1450));
        assert!(parse_link("[]").is_err());
    }

    #[test]
    fn tap_mirrors_eth0_and_teardown_removes_it() {
        assert!(nix::unistd::geteuid().is_root(), "netns tests run as root");
        let dir = tempfile::tempdir().unwrap();
        let ns = dir.path().join("tapns");
        super::super::netns::create(&ns).unwrap();
        // A veth eth0 stands in for the CNI one.
        let add = [
            "link", "add", POD_IFNAME, "mtu", "1400", "type", "veth", "peer", "name", "peer0",
        ];
        run(&ns, "ip", &add).unwrap();
        let vm = setup(&ns).unwrap();
        assert_eq!((vm.tap.as_str(), vm.mtu), (TAP_IFNAME, 1400));
        let tap = run(&ns, "ip", &["-j", "link", "show", "dev", TAP_IFNAME]).unwrap();
        assert!(tap.contains("\"mtu\":1400"), "{tap}");
        for (dev, to) in [(POD_IFNAME, TAP_IFNAME), (TAP_IFNAME, POD_IFNAME)] {
            let f = run(&ns, "tc", &["filter", "show", "dev", dev, "ingress"]).unwrap();
            assert!(f.contains(&format!("Redirect to device {to}")), "{f}");
        }
        teardown(&ns).unwrap();
        assert!(run(&ns, "ip", &["link", "show", "dev", TAP_IFNAME]).is_err());
        let f = run(&ns, "tc", &["qdisc", "show", "dev", POD_IFNAME, "ingress"]).unwrap();
        assert!(f.trim().is_empty(), "{f}");
        teardown(&ns).unwrap();
        super::super::netns::remove(&ns).unwrap();
        teardown(&ns).unwrap();
    }

    #[test]
    fn a_tap_made_before_eth0_is_connected_once_eth0_exists() {
        assert!(nix::unistd::geteuid().is_root(), "netns tests run as root");
        let dir = tempfile::tempdir().unwrap();
        let ns = dir.path().join("warmns");
        super::super::netns::create(&ns).unwrap();
        add_tap(&ns).unwrap();
        // No eth0 yet: connecting fails and takes the tap away with it.
        assert!(connect(&ns).is_err());
        assert!(run(&ns, "ip", &["link", "show", "dev", TAP_IFNAME]).is_err());
        add_tap(&ns).unwrap();
        let add = [
            "link", "add", POD_IFNAME, "mtu", "1380", "type", "veth", "peer", "name", "peer0",
        ];
        run(&ns, "ip", &add).unwrap();
        let vm = connect(&ns).unwrap();
        assert_eq!(vm.mtu, 1380);
        let eth0 = run(&ns, "ip", &["-j", "link", "show", "dev", POD_IFNAME]).unwrap();
        assert_eq!(parse_link(&eth0).unwrap().0, vm.mac);
        let tap = run(&ns, "ip", &["-j", "link", "show", "dev", TAP_IFNAME]).unwrap();
        assert!(tap.contains("\"mtu\":1380"), "{tap}");
        let f = run(&ns, "tc", &["filter", "show", "dev", TAP_IFNAME, "ingress"]).unwrap();
        assert!(
            f.contains(&format!("Redirect to device {POD_IFNAME}")),
            "{f}"
        );
        teardown(&ns).unwrap();
        super::super::netns::remove(&ns).unwrap();
    }
}
