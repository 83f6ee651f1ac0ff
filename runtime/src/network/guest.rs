//! What the guest is told about its network: the CNI result, re-expressed
//! for the agent's SetupSandbox (interface by MAC, addresses, routes).

use carapace_agent_api::v1::{NetworkInterface, Route};

use super::cni::CniResult;
use super::tap::VmNetwork;
use super::POD_IFNAME;

/// The agent's view of the pod network.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GuestNetwork {
    pub interfaces: Vec<NetworkInterface>,
    pub routes: Vec<Route>,
}

/// The guest interface gets eth0's MAC and MTU and the addresses CNI gave
/// eth0 (or given for no particular interface); a route without a gateway
/// goes through the gateway of its address family, as the CNI spec means
/// ("if omitted, a default gateway is assumed").
pub fn describe(result: &CniResult, vm: &VmNetwork) -> GuestNetwork {
    let eth0 = result
        .interfaces
        .iter()
        .position(|i| i.name == POD_IFNAME && !i.sandbox.is_empty());
    let ips: Vec<_> = result
        .ips
        .iter()
        .filter(|ip| ip.interface.is_none() || ip.interface == eth0)
        .collect();
    let is_v4 = |s: &str| !s.contains(':');
    let routes = result
        .routes
        .iter()
        .map(|r| {
            let gateway = r.gw.clone().unwrap_or_else(|| {
                ips.iter()
                    .filter(|ip| is_v4(&ip.address) == is_v4(&r.dst))
                    .find_map(|ip| ip.gateway.clone())
                    .unwrap_or_default()
            });
            Route {
                destination: r.dst.clone(),
                gateway,
            }
        })
        .collect();
    GuestNetwork {
        interfaces: vec![NetworkInterface {
            mac: vm.mac.clone(),
            mtu: vm.mtu,
            addresses: ips.iter().map(|ip| ip.address.clone()).collect(),
            device_mac: String::new(),
        }],
        routes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_result_becomes_the_guest_interface_and_routes() {
        let result: CniResult = serde_json::from_str(
            r#"{"cniVersion":"1.0.0",
                "interfaces":[{"name":"cni0","mac":"aa:aa:aa:aa:aa:01"},
                              {"name":"veth1","mac":"aa:aa:aa:aa:aa:02"},
                              {"name":"eth0","mac":"0a:58:0a:00:00:05","sandbox":"/run/ns"}],
                "ips":[{"address":"10.88.0.5/16","gateway":"10.88.0.1","interface":2},
                       {"address":"fd00::5/64","gateway":"fd00::1","interface":2},
                       {"address":"192.168.9.9/24","interface":0}],
                "routes":[{"dst":"0.0.0.0/0"},{"dst":"::/0"},{"dst":"10.99.0.0/16","gw":"10.88.0.254"}]}"#,
        )
        .unwrap();
        let vm = VmNetwork {
            netns: "/run/ns".into(),
            tap: "tap0".into(),
            mac: "0a:58:0a:00:00:05".into(),
            mtu: 1450,
        };
        let g = describe(&result, &vm);
        assert_eq!(g.interfaces.len(), 1);
        assert_eq!(g.interfaces[0].mac, "0a:58:0a:00:00:05");
        assert_eq!(g.interfaces[0].mtu, 1450);
        assert_eq!(g.interfaces[0].addresses, ["10.88.0.5/16", "fd00::5/64"]);
        let routes: Vec<(&str, &str)> = g
            .routes
            .iter()
            .map(|r| (r.destination.as_str(), r.gateway.as_str()))
            .collect();
        assert_eq!(
            routes,
            [
                ("0.0.0.0/0", "10.88.0.1"),
                ("::/0", "fd00::1"),
                ("10.99.0.0/16", "10.88.0.254")
            ]
        );
    }
}
