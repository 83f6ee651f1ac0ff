//! The pod interface's traffic counters, for the stats and metrics calls:
//! `/proc/net/dev` read from a thread inside the pod's namespace.
//!
//! Only eth0, the CNI interface, is reported. `tap0` carries the same
//! frames on their way to and from the VM (see `tap`), so counting it too
//! would count every byte twice.

use std::path::Path;

use super::{netns, NetworkError, POD_IFNAME};

/// One interface's counters, as the kernel keeps them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InterfaceCounters {
    pub name: String,
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_errors: u64,
    pub rx_dropped: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_errors: u64,
    pub tx_dropped: u64,
}

/// The interfaces of a `/proc/net/dev` text. Lines that are not an
/// interface's (the two headings, or anything malformed) are skipped.
pub fn parse_proc_net_dev(text: &str) -> Vec<InterfaceCounters> {
    text.lines()
        .filter_map(|line| {
            let (name, numbers) = line.split_once(':')?;
            let n: Vec<u64> = numbers
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?;
            // Receive: bytes packets errs drop fifo frame compressed
            // multicast; transmit: bytes packets errs drop fifo colls
            // carrier compressed.
            (n.len() == 16).then(|| InterfaceCounters {
                name: name.trim().to_owned(),
                rx_bytes: n[0],
                rx_packets: n[1],
                rx_errors: n[2],
                rx_dropped: n[3],
                tx_bytes: n[8],
                tx_packets: n[9],
                tx_errors: n[10],
                tx_dropped: n[11],
            })
        })
        .collect()
}

/// The pod interface's counters in the namespace pinned at `netns`.
pub fn pod_interface(netns: &Path) -> Result<InterfaceCounters, NetworkError> {
    let text = netns::run_in(netns, || {
        // `thread-self`: the namespace of this thread, which entered the
        // pod's; `/proc/net` follows the process's main thread.
        std::fs::read_to_string("/proc/thread-self/net/dev").map_err(|source| NetworkError::Io {
            what: "reading /proc/thread-self/net/dev".into(),
            source,
        })
    })?;
    parse_proc_net_dev(&text)
        .into_iter()
        .find(|i| i.name == POD_IFNAME)
        .ok_or_else(|| NetworkError::Command {
            what: format!("reading the counters of {POD_IFNAME}"),
            message: "no such interface in the pod's namespace".into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:     840      10    0    0    0     0          0         0      840      10    0    0    0     0       0          0
  eth0: 1234567    890    1    2    0     0          0         3   765432     456    4    5    0     0       0          0
  tap0: garbage
";

    #[test]
    fn proc_net_dev_parses_and_skips_what_is_not_an_interface() {
        let all = parse_proc_net_dev(SAMPLE);
        assert_eq!(all.len(), 2, "{all:?}");
        assert_eq!(
            all[1],
            InterfaceCounters {
                name: "eth0".into(),
                rx_bytes: 1_234_567,
                rx_packets: 890,
                rx_errors: 1,
                rx_dropped: 2,
                tx_bytes: 765_432,
                tx_packets: 456,
                tx_errors: 4,
                tx_dropped: 5,
            }
        );
        assert!(parse_proc_net_dev("").is_empty());
        assert!(parse_proc_net_dev("eth0: 1 2 3").is_empty());
    }

    #[test]
    fn a_namespace_without_eth0_is_an_error_and_a_missing_one_too() {
        assert!(nix::unistd::geteuid().is_root(), "netns tests run as root");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ns");
        netns::create(&path).unwrap();
        let err = pod_interface(&path).unwrap_err();
        assert!(err.to_string().contains("no such interface"), "{err}");
        netns::remove(&path).unwrap();
        assert!(pod_interface(&path).is_err());
    }

    #[test]
    fn counts_what_crosses_eth0_in_the_namespace() {
        assert!(nix::unistd::geteuid().is_root(), "netns tests run as root");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ns");
        netns::create(&path).unwrap();
        let run = |args: &[&str]| super::super::tap::run(&path, "ip", args).unwrap();
        // eth0 as one end of a veth pair, with a static neighbour: what is
        // sent to that address leaves through eth0.
        run(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
        ]);
        run(&["addr", "add", "10.99.0.1/24", "dev", "eth0"]);
        run(&[
            "neigh",
            "add",
            "10.99.0.2",
            "lladdr",
            "02:00:00:00:00:02",
            "dev",
            "eth0",
        ]);
        run(&["link", "set", "peer0", "up"]);
        run(&["link", "set", "eth0", "up"]);
        let before = pod_interface(&path).unwrap();
        netns::run_in(&path, || {
            let socket = std::net::UdpSocket::bind("10.99.0.1:0").unwrap();
            for _ in 0..3 {
                socket.send_to(&[7u8; 100], "10.99.0.2:9").unwrap();
            }
            Ok(())
        })
        .unwrap();
        let after = pod_interface(&path).unwrap();
        // 100 bytes of payload and 42 of UDP, IP and Ethernet headers
        // each; IPv6 may send its own solicitations meanwhile.
        assert!(after.tx_packets - before.tx_packets >= 3, "{after:?}");
        assert!(after.tx_bytes - before.tx_bytes >= 3 * 142, "{after:?}");
        netns::remove(&path).unwrap();
    }
}
