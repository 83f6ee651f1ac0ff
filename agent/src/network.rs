//! The pod network in the guest: the virtio-net interface that carries the
//! CNI interface's MAC gets its MTU, addresses and routes over rtnetlink,
//! and comes up with `lo`. The request is validated as a whole before the
//! first change.

use std::net::IpAddr;
use std::path::Path;

use carapace_agent_api::v1::{NetworkInterface, Route};
use rtnetlink::{LinkUnspec, RouteMessageBuilder};

/// Errors of network setup.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("no network interface with MAC {0}")]
    NoInterface(String),
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        source: rtnetlink::Error,
    },
    #[error("opening a netlink socket: {0}")]
    Socket(std::io::Error),
}

impl NetworkError {
    pub fn code(&self) -> tonic::Code {
        match self {
            NetworkError::Invalid(_) => tonic::Code::InvalidArgument,
            NetworkError::NoInterface(_) => tonic::Code::FailedPrecondition,
            _ => tonic::Code::Internal,
        }
    }
}

/// An address or destination with its prefix length.
fn parse_cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let (addr, len) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not in CIDR notation"))?;
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("{s:?}: invalid address"))?;
    let len: u8 = len.parse().map_err(|_| format!("{s:?}: invalid prefix"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(format!("{s:?}: prefix longer than {max}"));
    }
    Ok((addr, len))
}

/// The six bytes of a MAC that `parse_mac` accepted.
fn mac_bytes(mac: &str) -> Vec<u8> {
    mac.split(':')
        .filter_map(|p| u8::from_str_radix(p, 16).ok())
        .collect()
}

fn parse_mac(s: &str) -> Result<String, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let ok = parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
    if ok {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(format!("invalid MAC {s:?}"))
    }
}

/// Checks every interface and route (syntax, MTU range, route families,
/// gateway family).
pub fn validate(interfaces: &[NetworkInterface], routes: &[Route]) -> Result<(), NetworkError> {
    let invalid = NetworkError::Invalid;
    for i in interfaces {
        parse_mac(&i.mac).map_err(invalid)?;
        if !i.device_mac.is_empty() {
            parse_mac(&i.device_mac).map_err(invalid)?;
        }
        if i.mtu != 0 && !(68..=65535).contains(&i.mtu) {
            return Err(invalid(format!("MTU {} out of range", i.mtu)));
        }
        for a in &i.addresses {
            parse_cidr(a).map_err(invalid)?;
        }
    }
    for r in routes {
        let (dst, _) = parse_cidr(&r.destination).map_err(invalid)?;
        if !r.gateway.is_empty() {
            let gw: IpAddr = r
                .gateway
                .parse()
                .map_err(|_| invalid(format!("invalid gateway {:?}", r.gateway)))?;
            if gw.is_ipv4() != dst.is_ipv4() {
                return Err(invalid(format!(
                    "route to {} via {}: mixed address families",
                    r.destination, r.gateway
                )));
            }
        }
    }
    if !routes.is_empty() && interfaces.is_empty() {
        return Err(invalid("routes without an interface".into()));
    }
    Ok(())
}

/// The interface index of the interface with `mac` (sysfs).
fn index_by_mac(mac: &str) -> Result<u32, NetworkError> {
    let dir = Path::new("/sys/class/net");
    let entries = std::fs::read_dir(dir).map_err(NetworkError::Socket)?;
    for entry in entries.filter_map(Result::ok) {
        let read = |name: &str| std::fs::read_to_string(entry.path().join(name));
        if read("address").is_ok_and(|a| a.trim().eq_ignore_ascii_case(mac)) {
            if let Some(index) = read("ifindex").ok().and_then(|i| i.trim().parse().ok()) {
                return Ok(index);
            }
        }
    }
    Err(NetworkError::NoInterface(mac.to_owned()))
}

/// The MAC the guest device has now: `device_mac` when given, else `mac`.
fn device_mac(i: &NetworkInterface) -> String {
    if i.device_mac.is_empty() {
        i.mac.to_ascii_lowercase()
    } else {
        i.device_mac.to_ascii_lowercase()
    }
}

/// Applies a validated request: `lo` up, then each interface (MTU, up,
/// addresses), then the routes (through the first interface).
pub async fn configure(
    interfaces: &[NetworkInterface],
    routes: &[Route],
) -> Result<(), NetworkError> {
    validate(interfaces, routes)?;
    let indices = interfaces
        .iter()
        .map(|i| index_by_mac(&device_mac(i)))
        .collect::<Result<Vec<_>, _>>()?;
    let (connection, handle, _) = rtnetlink::new_connection().map_err(NetworkError::Socket)?;
    let task = tokio::spawn(connection);
    let result = apply(&handle, interfaces, &indices, routes).await;
    task.abort();
    result
}

async fn apply(
    handle: &rtnetlink::Handle,
    interfaces: &[NetworkInterface],
    indices: &[u32],
    routes: &[Route],
) -> Result<(), NetworkError> {
    let netlink = |what: String| move |source| NetworkError::Netlink { what, source };
    let lo = index_by_name("lo").unwrap_or(1);
    handle
        .link()
        .set(LinkUnspec::new_with_index(lo).up().build())
        .execute()
        .await
        .map_err(netlink("bringing lo up".into()))?;
    for (iface, &index) in interfaces.iter().zip(indices) {
        let mac = iface.mac.to_ascii_lowercase();
        if device_mac(iface) != mac {
            // Before the link goes up: virtio-net takes a new address while
            // down without asking the device (or through its control queue).
            handle
                .link()
                .set(
                    LinkUnspec::new_with_index(index)
                        .address(mac_bytes(&mac))
                        .build(),
                )
                .execute()
                .await
                .map_err(netlink(format!(
                    "giving the interface {} its MAC {mac}",
                    device_mac(iface)
                )))?;
        }
        let mut link = LinkUnspec::new_with_index(index).up();
        if iface.mtu != 0 {
            link = link.mtu(iface.mtu);
        }
        handle
            .link()
            .set(link.build())
            .execute()
            .await
            .map_err(netlink(format!("setting up the interface {}", iface.mac)))?;
        for cidr in &iface.addresses {
            let (addr, len) = parse_cidr(cidr).map_err(NetworkError::Invalid)?;
            handle
                .address()
                .add(index, addr, len)
                .execute()
                .await
                .map_err(netlink(format!("adding {cidr} to {}", iface.mac)))?;
        }
    }
    let Some(&out) = indices.first() else {
        return Ok(());
    };
    for r in routes {
        let (dst, len) = parse_cidr(&r.destination).map_err(NetworkError::Invalid)?;
        let gw: Option<IpAddr> = r.gateway.parse().ok();
        let message = match (dst, gw) {
            (IpAddr::V4(d), gw) => {
                let mut b = RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                    .destination_prefix(d, len)
                    .output_interface(out);
                if let Some(IpAddr::V4(g)) = gw {
                    b = b.gateway(g);
                }
                b.build()
            }
            (IpAddr::V6(d), gw) => {
                let mut b = RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                    .destination_prefix(d, len)
                    .output_interface(out);
                if let Some(IpAddr::V6(g)) = gw {
                    b = b.gateway(g);
                }
                b.build()
            }
        };
        handle
            .route()
            .add(message)
            .execute()
            .await
            .map_err(netlink(format!(
                "adding the route to {} via {:?}",
                r.destination, r.gateway
            )))?;
    }
    Ok(())
}

fn index_by_name(name: &str) -> Option<u32> {
    std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
        .ok()
        .and_then(|i| i.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(mac: &str, mtu: u32, addrs: &[&str]) -> NetworkInterface {
        NetworkInterface {
            mac: mac.into(),
            mtu,
            addresses: addrs.iter().map(|a| a.to_string()).collect(),
            device_mac: String::new(),
        }
    }

    fn route(dst: &str, gw: &str) -> Route {
        Route {
            destination: dst.into(),
            gateway: gw.into(),
        }
    }

    #[test]
    fn valid_requests_pass() {
        let i = [iface(
            "0A:58:0a:00:00:05",
            1450,
            &["10.0.0.5/24", "fd00::5/64"],
        )];
        let r = [
            route("0.0.0.0/0", "10.0.0.1"),
            route("::/0", ""),
            route("10.1.0.0/16", ""),
        ];
        assert!(validate(&i, &r).is_ok());
        assert!(validate(&[], &[]).is_ok());
    }

    #[test]
    fn invalid_requests_are_refused() {
        let ok = || iface("0a:58:0a:00:00:05", 0, &["10.0.0.5/24"]);
        let bad: Vec<(Vec<NetworkInterface>, Vec<Route>)> = vec![
            (vec![iface("0a:58:0a:00:00", 0, &[])], vec![]),
            (vec![iface("zz:58:0a:00:00:05", 0, &[])], vec![]),
            (vec![iface("0a:58:0a:00:00:05", 20, &[])], vec![]),
            (vec![iface("0a:58:0a:00:00:05", 0, &["10.0.0.5"])], vec![]),
            (
                vec![iface("0a:58:0a:00:00:05", 0, &["10.0.0.5/33"])],
                vec![],
            ),
            (vec![ok()], vec![route("0.0.0.0/0", "fd00::1")]),
            (vec![ok()], vec![route("default", "")]),
            (vec![], vec![route("0.0.0.0/0", "")]),
            (
                vec![NetworkInterface {
                    device_mac: "0a:58:0a:00:00".into(),
                    ..ok()
                }],
                vec![],
            ),
        ];
        for (i, r) in bad {
            assert!(
                matches!(validate(&i, &r), Err(NetworkError::Invalid(_))),
                "{i:?} {r:?}"
            );
        }
    }

    #[test]
    fn the_device_is_found_by_its_current_mac() {
        let mut i = iface("0A:58:0a:00:00:05", 0, &[]);
        assert_eq!(device_mac(&i), "0a:58:0a:00:00:05");
        i.device_mac = "02:CA:00:00:00:01".into();
        assert_eq!(device_mac(&i), "02:ca:00:00:00:01");
        assert!(validate(&[i], &[]).is_ok());
        assert_eq!(
            mac_bytes("0a:58:0a:00:00:ff"),
            vec![0x0a, 0x58, 0x0a, 0, 0, 0xff]
        );
    }
}
