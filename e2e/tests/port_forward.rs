//! Port-forward into a pod VM as kubelet and kubectl use it: CRI
//! PortForward, then the returned URL over WebSocket (a client library,
//! not our server code), over SPDY/3.1 with a client built on our framing,
//! and with the real `kubectl port-forward` through a fake API server. The
//! pod runs busybox `nc` as a TCP server that greets with the pod's
//! hostname and echoes until the client half-closes.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use carapace_e2e::cri::{self, Cri};
use carapace_e2e::daemon::{processes_mentioning, Daemon};
use carapace_e2e::fake_apiserver::{self, ApiReply, ApiRequest};
use carapace_e2e::streaming_client::{connect, read_to_end, SpdyClient, Ws};
use futures_util::{SinkExt, StreamExt};
use k8s_cri::v1::{ExecSyncRequest, PortForwardRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tonic::Code;

const GREETING: &str = "pod:pf-0\n";

/// The server: every connection gets the hostname, then `cat`. Busybox nc
/// listens with a backlog of one per `-l`: with `-ll` (2) ten connections
/// at once overflow its accept queue, and the guest's TCP then resets some
/// of them (seen as "connection reset by peer" in the agent), so 16.
const SERVER: &str = "printf '#!/bin/sh\\necho pod:$(hostname)\\nexec cat\\n' > /tmp/echo && \
                      chmod +x /tmp/echo && exec nc -llllllllllllllll -p 8080 -e /tmp/echo";

async fn url(cri: &mut Cri, pod: &str, ports: &[i32]) -> String {
    cri.port_forward(PortForwardRequest {
        pod_sandbox_id: pod.into(),
        port: ports.to_vec(),
    })
    .await
    .expect("PortForward")
    .into_inner()
    .url
}

/// Established TCP connections to port 8080 in the guest (both ends of
/// each forwarded connection live there: the agent's and the server's).
async fn guest_connections(cri: &mut Cri, container: &str) -> usize {
    let out = cri
        .exec_sync(ExecSyncRequest {
            container_id: container.into(),
            cmd: vec!["netstat".into(), "-tn".into()],
            timeout: 10,
        })
        .await
        .expect("ExecSync netstat")
        .into_inner();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(":8080 ") && l.contains("ESTABLISHED"))
        .count()
}

/// Open file descriptors of the VM's processes (QEMU, vhost-device-vsock,
/// virtiofsd): each host vsock connection holds one in the vsock backend.
fn vm_fds(daemon: &Daemon) -> usize {
    processes_mentioning(&daemon.run_dir())
        .into_iter()
        .filter_map(|pid| std::fs::read_dir(format!("/proc/{pid}/fd")).ok())
        .map(|d| d.count())
        .sum()
}

/// Waits until the guest has no forwarded connection left and the VM's
/// processes hold `baseline` descriptors again.
async fn wait_released(cri: &mut Cri, container: &str, daemon: &Daemon, baseline: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let guest = guest_connections(cri, container).await;
        let fds = vm_fds(daemon);
        if guest == 0 && fds <= baseline {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not released: {guest} guest connections, {fds} VM fds (baseline {baseline})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn port_forward_over_websocket_spdy_and_kubectl() {
    let daemon = Daemon::start_with_busybox().await;
    let mut cri = daemon.runtime().await;
    let logs = tempfile::tempdir().unwrap();
    let pod_config = cri::pod_config("pf", logs.path());
    let pod = cri::run_pod(&mut cri, &daemon, &pod_config).await;
    let server = cri::create_running(
        &mut cri,
        &pod,
        cri::busybox("server", &["sh", "-c", SERVER], "server.log"),
        &pod_config,
    )
    .await;
    // nc listens once the shell got there.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = cri
            .exec_sync(ExecSyncRequest {
                container_id: server.clone(),
                cmd: vec!["netstat".into(), "-tln".into()],
                timeout: 10,
            })
            .await
            .unwrap()
            .into_inner();
        if String::from_utf8_lossy(&out.stdout).contains(":8080 ") {
            break;
        }
        assert!(Instant::now() < deadline, "nc never listened");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let baseline = vm_fds(&daemon);

    // CRI argument errors.
    let e = cri
        .port_forward(PortForwardRequest {
            pod_sandbox_id: "nope".into(),
            port: vec![80],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    let e = cri
        .port_forward(PortForwardRequest {
            pod_sandbox_id: pod.clone(),
            port: vec![70000],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");

    websocket(&mut cri, &pod, &server, &daemon, baseline).await;
    spdy(&mut cri, &pod, &server, &daemon, baseline).await;
    kubectl(&cri, &pod, logs.path()).await;
    let log = daemon.log();
    for over in ["WebSocket", "SPDY", "SPDY in a WebSocket tunnel"] {
        assert!(
            log.contains(&format!("port-forward session over {over} pod=")),
            "no session over {over}"
        );
    }

    cri::remove_pod(&mut cri, &pod).await;
}

/// The next message: its channel and data.
async fn ws_next(ws: &mut Ws) -> (u8, Vec<u8>) {
    let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
        .await
        .expect("no WebSocket message within 30 s")
        .expect("the WebSocket ended")
        .expect("WebSocket error");
    match msg {
        Message::Binary(b) => (b[0], b[1..].to_vec()),
        other => panic!("unexpected {other:?}"),
    }
}

async fn websocket(cri: &mut Cri, pod: &str, server: &str, daemon: &Daemon, baseline: usize) {
    let url = url(cri, pod, &[8080, 8081]).await;
    let mut ws = connect(&url, "v4.channel.k8s.io").await.unwrap();
    let mut seen: HashMap<u8, Vec<u8>> = HashMap::new();
    let mut firsts = Vec::new();
    // Each channel first carries its port (little endian); then the greeting
    // on 0 and the refusal on 3, in any order.
    while !(String::from_utf8_lossy(seen.get(&0).map_or(&[][..], |v| v)).contains(GREETING)
        && String::from_utf8_lossy(seen.get(&3).map_or(&[][..], |v| v)).contains("refused"))
    {
        let (channel, data) = ws_next(&mut ws).await;
        if !firsts.contains(&channel) {
            firsts.push(channel);
            let port: u16 = if channel < 2 { 8080 } else { 8081 };
            assert_eq!(data, port.to_le_bytes(), "channel {channel}");
            continue;
        }
        seen.entry(channel).or_default().extend_from_slice(&data);
    }
    let error = String::from_utf8_lossy(&seen[&3]).into_owned();
    assert!(
        error.contains("error forwarding port 8081")
            && error.contains("dial tcp 127.0.0.1:8081: connect: connection refused"),
        "{error}"
    );
    assert!(seen.get(&1).is_none_or(|e| e.is_empty()), "{seen:?}");
    // The refused port did not end the session: port 8080 still echoes.
    assert!(guest_connections(cri, server).await >= 2);
    ws.send(Message::binary(b"\x00over websocket\n".to_vec()))
        .await
        .unwrap();
    let mut echo = Vec::new();
    while !echo.ends_with(b"over websocket\n") {
        let (channel, data) = ws_next(&mut ws).await;
        assert_eq!(channel, 0, "{}", String::from_utf8_lossy(&data));
        echo.extend_from_slice(&data);
    }
    // The client leaves: the connection is closed in the guest, the vsock
    // connection on the host.
    ws.close(None).await.unwrap();
    drop(ws);
    wait_released(cri, server, daemon, baseline).await;
}

async fn spdy(cri: &mut Cri, pod: &str, server: &str, daemon: &Daemon, baseline: usize) {
    let url = url(cri, pod, &[]).await;
    let client = SpdyClient::connect(&url).await;

    // A connection that stays open through the others.
    let (long_id, mut long_data, _long_error) = client.forward(8080, 100).await;
    let mut got = Vec::new();
    while !got.ends_with(GREETING.as_bytes()) {
        got.extend(long_data.recv().await.unwrap().expect("greeting"));
    }

    // A refused port: the error on its error stream, both streams end.
    let (_, mut refused_data, mut refused_error) = client.forward(8081, 101).await;
    let error = String::from_utf8(read_to_end(&mut refused_error).await).unwrap();
    assert!(
        error.contains("error forwarding port 8081")
            && error.contains("dial tcp 127.0.0.1:8081: connect: connection refused"),
        "{error}"
    );
    assert!(read_to_end(&mut refused_data).await.is_empty());

    // Ten at once, each with its own 200 KiB, echoed after the half-close.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..10u8 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let (id, mut data, mut error) = client.forward(8080, usize::from(i)).await;
            let payload: Vec<u8> = (0..200 * 1024)
                .map(|n| b'a' + ((n + usize::from(i)) % 26) as u8)
                .collect();
            for piece in payload.chunks(16 * 1024) {
                client.send(id, piece, false).await;
            }
            client.send(id, b"", true).await;
            let got = read_to_end(&mut data).await;
            let error = String::from_utf8_lossy(&read_to_end(&mut error).await).into_owned();
            assert!(error.is_empty(), "connection {i}: {error}");
            assert!(
                got.starts_with(GREETING.as_bytes()),
                "connection {i}: {:?}",
                String::from_utf8_lossy(&got[..got.len().min(100)])
            );
            assert!(
                got[GREETING.len()..] == payload[..],
                "connection {i}: echo differs"
            );
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let took = started.elapsed();
    eprintln!(
        "10 concurrent port-forward connections, 2 x 200 KiB each: {took:?} ({:.1} MiB/s)",
        (10.0 * 2.0 * 200.0 / 1024.0) / took.as_secs_f64()
    );

    // The long one still works, and is open in the guest.
    assert!(guest_connections(cri, server).await >= 2);
    client.send(long_id, b"still here\n", false).await;
    let mut got = Vec::new();
    while !got.ends_with(b"still here\n") {
        got.extend(long_data.recv().await.unwrap().expect("echo"));
    }
    // The client goes away without closing anything: all is released.
    drop(client);
    wait_released(cri, server, daemon, baseline).await;
}

/// The real kubectl (client-go's SPDY port-forward, Go's zlib) through a
/// fake API server that hands its request to the URL of a CRI PortForward,
/// as kubelet's proxy does.
async fn kubectl(cri: &Cri, pod: &str, dir: &std::path::Path) {
    // SPDY, and SPDY tunnelled in a WebSocket (kubectl's default).
    for websockets in ["false", "true"] {
        kubectl_with(cri, pod, dir, websockets).await;
    }
}

async fn kubectl_with(cri: &Cri, pod: &str, dir: &std::path::Path, websockets: &'static str) {
    let api = fake_apiserver(cri.clone(), pod.to_owned()).await;
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://{api}\n\
             contexts:\n- name: c\n  context:\n    cluster: c\n    namespace: default\n\
             current-context: c\nusers: []\n"
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new("kubectl")
        .env("KUBECTL_PORT_FORWARD_WEBSOCKETS", websockets)
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["port-forward", "--address", "127.0.0.1", "pod/pf", ":8080"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("running kubectl (scripts/setup.sh installs it)");
    let mut stdout = child.stdout.take().unwrap();
    let mut out = Vec::new();
    let local = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let mut b = [0u8; 256];
            let n = stdout.read(&mut b).await.unwrap();
            assert!(n > 0, "kubectl ended: {}", String::from_utf8_lossy(&out));
            out.extend_from_slice(&b[..n]);
            let text = String::from_utf8_lossy(&out);
            if let Some(rest) = text.split("Forwarding from 127.0.0.1:").nth(1) {
                if let Some((port, _)) = rest.split_once(" ->") {
                    return port.parse::<u16>().unwrap();
                }
            }
        }
    })
    .await
    .expect("kubectl did not start forwarding");
    // Three connections at once through kubectl.
    let mut tasks = Vec::new();
    for i in 0..3 {
        tasks.push(tokio::spawn(async move {
            let mut tcp = TcpStream::connect(("127.0.0.1", local)).await.unwrap();
            let line = format!("kubectl connection {i}\n");
            tcp.write_all(line.as_bytes()).await.unwrap();
            tcp.shutdown().await.unwrap();
            let mut got = Vec::new();
            tokio::time::timeout(Duration::from_secs(60), tcp.read_to_end(&mut got))
                .await
                .expect("kubectl connection did not end")
                .unwrap();
            assert_eq!(
                String::from_utf8_lossy(&got),
                format!("{GREETING}{line}"),
                "websockets={websockets}"
            );
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    child.kill().await.unwrap();
}

/// An API server that knows the running pod `pf` and hands its
/// port-forward requests to the streaming server.
async fn fake_apiserver(cri: Cri, pod: String) -> std::net::SocketAddr {
    fake_apiserver::serve(move |req: ApiRequest| {
        let mut cri = cri.clone();
        let pod = pod.clone();
        async move {
            match req.path.as_str() {
                "/api/v1/namespaces/default/pods/pf/portforward" => {
                    ApiReply::Stream(url(&mut cri, &pod, &[]).await)
                }
                "/api/v1/namespaces/default/pods/pf" => ApiReply::Json(
                    r#"{"kind":"Pod","apiVersion":"v1","metadata":{"name":"pf","namespace":"default"},"spec":{"containers":[{"name":"server","image":"busybox"}]},"status":{"phase":"Running"}}"#.into(),
                ),
                path => fake_apiserver::discovery(
                    path,
                    r#"{"name":"pods","singularName":"pod","namespaced":true,"kind":"Pod","verbs":["get","list"],"shortNames":["po"]},{"name":"pods/portforward","singularName":"","namespaced":true,"kind":"PodPortForwardOptions","verbs":["create","get"]}"#,
                )
                .map_or(ApiReply::NotFound, ApiReply::Json),
            }
        }
    })
    .await
}
