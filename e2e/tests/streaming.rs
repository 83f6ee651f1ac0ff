//! The streaming server as kubelet and crictl use it: Exec through CRI,
//! then the returned URL with a WebSocket client library (not our server
//! code) and our SPDY/3.1 client, against busybox containers in a real pod
//! VM.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use carapace_e2e::cri::{self, Cri};
use carapace_e2e::daemon::Daemon;
use carapace_e2e::fake_apiserver::{self, ApiReply, ApiRequest};
use carapace_e2e::streaming_client::{connect, read_all, Seen, Ws};
use futures_util::{SinkExt, StreamExt};
use k8s_cri::v1::{
    AttachRequest, ContainerConfig, ContainerState, CreateContainerRequest, ExecRequest,
    PodSandboxConfig, RemovePodSandboxRequest, StartContainerRequest, StopPodSandboxRequest,
};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tonic::Code;

fn pod_config(log_dir: &Path) -> PodSandboxConfig {
    cri::pod_config("stream", log_dir)
}

fn container(name: &str, cmd: &[&str]) -> ContainerConfig {
    cri::busybox(name, cmd, &format!("{name}.log"))
}

async fn wait_running(cri: &mut Cri, id: &str) {
    cri::wait_state(cri, id, ContainerState::ContainerRunning).await;
}

fn exec_request(id: &str, cmd: &[&str], stdin: bool, tty: bool) -> ExecRequest {
    ExecRequest {
        container_id: id.into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        tty,
        stdin,
        stdout: true,
        stderr: !tty,
    }
}

async fn exec_url(cri: &mut Cri, request: ExecRequest) -> String {
    cri.exec(request).await.expect("Exec").into_inner().url
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_sessions_close_and_tokens_expire() {
    let mut daemon = Daemon::start_with_busybox().await;
    daemon.append_config("[streaming]\nidle_timeout_secs = 2\ntoken_ttl_secs = 1");
    daemon.restart().await;
    let mut cri = daemon.runtime().await;
    let logs = tempfile::tempdir().unwrap();
    let pod_config = pod_config(logs.path());
    let pod = cri::run_pod(&mut cri, &daemon, &pod_config).await;
    let id = cri::create_running(
        &mut cri,
        &pod,
        container("app", &["sleep", "3600"]),
        &pod_config,
    )
    .await;

    // An expired URL: 410.
    let url = exec_url(&mut cri, exec_request(&id, &["true"], false, false)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    match connect(&url, "v5.channel.k8s.io").await {
        Err(WsError::Http(r)) => assert_eq!(r.status(), 410),
        other => panic!("an expired token was accepted: {:?}", other.map(|_| ())),
    }

    // A silent session is closed after the idle timeout, its process killed.
    let url = exec_url(&mut cri, exec_request(&id, &["sleep", "31"], false, false)).await;
    let started = Instant::now();
    let mut ws = connect(&url, "v5.channel.k8s.io").await.unwrap();
    assert!(sleepers(&mut cri, &id).await > 0, "the exec is not running");
    let seen = read_all(&mut ws).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(10),
        "closed after {took:?}: {seen:?}"
    );
    assert!(seen.status.is_empty(), "{seen:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while sleepers(&mut cri, &id).await > 0 {
        assert!(Instant::now() < deadline, "the idle exec still runs");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    cri.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .expect("StopPodSandbox");
    cri.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .expect("RemovePodSandbox");
}

/// How many `sleep 31` processes run in the container.
async fn sleepers(cri: &mut Cri, id: &str) -> usize {
    let ps = cri
        .exec_sync(k8s_cri::v1::ExecSyncRequest {
            container_id: id.into(),
            cmd: vec!["ps".into(), "-o".into(), "args".into()],
            timeout: 10,
        })
        .await
        .expect("ExecSync")
        .into_inner();
    String::from_utf8_lossy(&ps.stdout)
        .lines()
        .filter(|l| l.trim() == "sleep 31")
        .count()
}

/// Reads stdout until it contains `needle`.
async fn read_until(ws: &mut Ws, needle: &str) -> String {
    let mut stdout = String::new();
    let read = async {
        while !stdout.contains(needle) {
            match ws.next().await {
                Some(Ok(Message::Binary(b))) if b.first() == Some(&1) => {
                    stdout.push_str(&String::from_utf8_lossy(&b[1..]))
                }
                Some(Ok(_)) => {}
                other => panic!("the session ended: {other:?}; stdout {stdout:?}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .unwrap_or_else(|_| panic!("never saw {needle:?}"));
    stdout
}

fn status_json(seen: &Seen) -> serde_json::Value {
    serde_json::from_str(&seen.status).unwrap_or_else(|e| panic!("status {seen:?}: {e}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_attach_over_websocket_and_spdy_and_refused_tokens() {
    let daemon = Daemon::start_with_busybox().await;
    let mut cri = daemon.runtime().await;
    let logs = tempfile::tempdir().unwrap();
    let pod_config = pod_config(logs.path());
    let pod = cri::run_pod(&mut cri, &daemon, &pod_config).await;
    let id = cri::create_running(
        &mut cri,
        &pod,
        container("app", &["sleep", "3600"]),
        &pod_config,
    )
    .await;

    // CRI's rules: tty with stderr, nothing requested, unknown container.
    let mut bad = exec_request(&id, &["true"], false, true);
    bad.stderr = true;
    assert_eq!(
        cri.exec(bad).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let mut bad = exec_request(&id, &["true"], false, false);
    (bad.stdout, bad.stderr) = (false, false);
    assert_eq!(
        cri.exec(bad).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let err = cri
        .exec(exec_request(&"0".repeat(64), &["true"], false, false))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // v5: stdout, stderr, success.
    let url = exec_url(
        &mut cri,
        exec_request(&id, &["sh", "-c", "echo out; echo err >&2"], false, false),
    )
    .await;
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let mut ws = connect(&url, "v5.channel.k8s.io, v4.channel.k8s.io")
        .await
        .unwrap();
    let seen = read_all(&mut ws).await;
    assert_eq!(seen.stdout, "out\n", "{seen:?}");
    assert_eq!(seen.stderr, "err\n", "{seen:?}");
    assert_eq!(status_json(&seen)["status"], "Success", "{seen:?}");

    // The same URL again: refused. A made-up one: refused.
    match connect(&url, "v5.channel.k8s.io").await {
        Err(WsError::Http(r)) => assert_eq!(r.status(), 404),
        other => panic!("a used token was accepted: {:?}", other.map(|_| ())),
    }
    let made_up = format!(
        "{}/exec/{}",
        &url[..url.rfind("/exec/").unwrap()],
        "ab".repeat(32)
    );
    match connect(&made_up, "v5.channel.k8s.io").await {
        Err(WsError::Http(r)) => assert_eq!(r.status(), 404),
        other => panic!("an unknown token was accepted: {:?}", other.map(|_| ())),
    }

    // v4: the exit code of a failing command, exactly.
    let url = exec_url(
        &mut cri,
        exec_request(&id, &["sh", "-c", "exit 3"], false, false),
    )
    .await;
    let mut ws = connect(&url, "v4.channel.k8s.io").await.unwrap();
    let seen = read_all(&mut ws).await;
    let status = status_json(&seen);
    assert_eq!(status["status"], "Failure", "{seen:?}");
    assert_eq!(status["reason"], "NonZeroExitCode", "{seen:?}");
    assert_eq!(status["details"]["causes"][0]["reason"], "ExitCode");
    assert_eq!(status["details"]["causes"][0]["message"], "3");

    // No output lost at exit: 200 KiB written just before exiting.
    let url = exec_url(
        &mut cri,
        exec_request(
            &id,
            &["sh", "-c", "head -c 204800 /dev/zero | tr '\\0' x"],
            false,
            false,
        ),
    )
    .await;
    let mut ws = connect(&url, "v5.channel.k8s.io").await.unwrap();
    let seen = read_all(&mut ws).await;
    assert_eq!(seen.stdout.len(), 204800);
    assert!(seen.stdout.bytes().all(|b| b == b'x'));

    // v5 stdin, closed by the client: cat sees end of file.
    let url = exec_url(&mut cri, exec_request(&id, &["cat"], true, false)).await;
    let mut ws = connect(&url, "v5.channel.k8s.io").await.unwrap();
    ws.send(Message::binary(b"\x00hello\n".to_vec()))
        .await
        .unwrap();
    ws.send(Message::binary(vec![255, 0])).await.unwrap();
    let seen = read_all(&mut ws).await;
    assert_eq!(seen.stdout, "hello\n", "{seen:?}");
    assert_eq!(status_json(&seen)["status"], "Success");

    // TTY: a resize is what `stty size` reports.
    let url = exec_url(
        &mut cri,
        exec_request(&id, &["sh", "-c", "read x; stty size"], true, true),
    )
    .await;
    let mut ws = connect(&url, "v5.channel.k8s.io").await.unwrap();
    let mut resize = vec![4u8];
    resize.extend_from_slice(br#"{"Width":100,"Height":30}"#);
    ws.send(Message::binary(resize)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    ws.send(Message::binary(b"\x00go\r".to_vec()))
        .await
        .unwrap();
    let seen = read_all(&mut ws).await;
    assert!(seen.stdout.contains("30 100"), "{seen:?}");
    assert_eq!(status_json(&seen)["status"], "Success");

    // SPDY/3.1, as crictl and kubelet's proxy speak it, with a client
    // built on our framing code.
    let url = exec_url(
        &mut cri,
        exec_request(
            &id,
            &["sh", "-c", "echo spdy; echo oops >&2; exit 7"],
            false,
            false,
        ),
    )
    .await;
    let seen = spdy_exec(&url, None, None).await;
    assert_eq!(seen.stdout, "spdy\n", "{seen:?}");
    assert_eq!(seen.stderr, "oops\n", "{seen:?}");
    let status = status_json(&seen);
    assert_eq!(status["details"]["causes"][0]["message"], "7", "{seen:?}");
    let url = exec_url(&mut cri, exec_request(&id, &["cat"], true, false)).await;
    let seen = spdy_exec(&url, Some(b"over spdy\n"), None).await;
    assert_eq!(seen.stdout, "over spdy\n", "{seen:?}");
    assert_eq!(status_json(&seen)["status"], "Success");
    // A terminal and its resize stream.
    let url = exec_url(
        &mut cri,
        exec_request(&id, &["sh", "-c", "read x; stty size"], true, true),
    )
    .await;
    let seen = spdy_exec(&url, Some(b"go\r"), Some(r#"{"Width":91,"Height":17}"#)).await;
    assert!(seen.stdout.contains("17 91"), "{seen:?}");
    assert_eq!(status_json(&seen)["status"], "Success");

    // Attach: two sessions to a container whose main process is `cat` with
    // a stdin; what one writes, both see.
    let mut echoer = container("echoer", &["cat"]);
    echoer.stdin = true;
    let echoer = cri
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(echoer),
            sandbox_config: Some(pod_config.clone()),
        })
        .await
        .expect("CreateContainer")
        .into_inner()
        .container_id;
    cri.start_container(StartContainerRequest {
        container_id: echoer.clone(),
    })
    .await
    .expect("StartContainer");
    wait_running(&mut cri, &echoer).await;
    let attach = |stdin: bool| AttachRequest {
        container_id: echoer.clone(),
        stdin,
        tty: false,
        stdout: true,
        stderr: true,
    };
    let url_a = cri
        .attach(attach(true))
        .await
        .expect("Attach")
        .into_inner()
        .url;
    let url_b = cri
        .attach(attach(false))
        .await
        .expect("Attach")
        .into_inner()
        .url;
    assert!(url_a.contains("/attach/"), "{url_a}");
    let mut a = connect(&url_a, "v5.channel.k8s.io").await.unwrap();
    let mut b = connect(&url_b, "v4.channel.k8s.io").await.unwrap();
    // Both sessions are subscribed once their upgrade is answered.
    a.send(Message::binary(b"\x00to both\n".to_vec()))
        .await
        .unwrap();
    assert!(read_until(&mut a, "to both").await.contains("to both"));
    assert!(read_until(&mut b, "to both").await.contains("to both"));
    // One leaves; the container and the other session go on.
    drop(a);
    let url_c = cri
        .attach(attach(true))
        .await
        .expect("Attach")
        .into_inner()
        .url;
    let mut c = connect(&url_c, "v5.channel.k8s.io").await.unwrap();
    c.send(Message::binary(b"\x00again\n".to_vec()))
        .await
        .unwrap();
    assert!(read_until(&mut b, "again").await.contains("again"));
    assert!(read_until(&mut c, "again").await.contains("again"));

    // The real kubectl (a Go client: gorilla/websocket, and spdystream with
    // Go's zlib) through a fake API server that forwards its exec request
    // to the URL of a CRI Exec, as kubelet's proxy does.
    let api = fake_apiserver(
        cri.clone(),
        HashMap::from([
            ("app".to_string(), id.clone()),
            ("echoer".to_string(), echoer.clone()),
        ]),
    )
    .await;
    let kubeconfig = logs.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://{api}\n\
             contexts:\n- name: c\n  context:\n    cluster: c\n    namespace: default\n\
             current-context: c\nusers: []\n"
        ),
    )
    .unwrap();
    for websockets in ["true", "false"] {
        let out = tokio::process::Command::new("kubectl")
            .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", websockets)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args([
                "exec",
                "stream",
                "-c",
                "app",
                "--",
                "sh",
                "-c",
                "echo from kubectl; echo to stderr >&2; exit 5",
            ])
            .output()
            .await
            .expect("running kubectl (scripts/setup.sh installs it)");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            stdout, "from kubectl\n",
            "websockets={websockets}: {stderr}"
        );
        assert!(
            stderr.contains("to stderr"),
            "websockets={websockets}: {stderr}"
        );
        assert_eq!(
            out.status.code(),
            Some(5),
            "websockets={websockets}: {stderr}"
        );
        let out = tokio::process::Command::new("kubectl")
            .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", websockets)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["exec", "-i", "stream", "-c", "app", "--", "cat"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut child = out;
        {
            use tokio::io::AsyncWriteExt;
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(b"piped through\n").await.unwrap();
        }
        let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .expect("kubectl exec -i ended")
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "piped through\n",
            "websockets={websockets}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(0));

        // kubectl attach -i to the `cat` container: its line comes back.
        let mut child = tokio::process::Command::new("kubectl")
            .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", websockets)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["attach", "-i", "stream", "-c", "echoer"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let line = format!("attached with websockets={websockets}\n");
        let mut seen = String::new();
        let read = async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            // kubectl may connect after the first write: repeat it.
            loop {
                stdin.write_all(line.as_bytes()).await.unwrap();
                let mut buf = [0u8; 4096];
                match tokio::time::timeout(Duration::from_secs(1), stdout.read(&mut buf)).await {
                    Ok(Ok(0)) => panic!("kubectl attach ended: {seen:?}"),
                    Ok(Ok(n)) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
                    Ok(Err(e)) => panic!("{e}"),
                    Err(_) => {}
                }
                if seen.contains(&line) {
                    return;
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(30), read)
            .await
            .is_err()
        {
            child.start_kill().unwrap();
            let out = child.wait_with_output().await.unwrap();
            panic!(
                "kubectl attach (websockets={websockets}) never echoed: {seen:?}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        child.start_kill().unwrap();
        let _ = child.wait().await;
    }

    cri.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .expect("StopPodSandbox");
    cri.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .expect("RemovePodSandbox");
}

/// A SPDY/3.1 remotecommand client (v4): upgrade, open the error, stdout,
/// stderr (and stdin) streams, read to the end of the error stream.
async fn spdy_exec(url: &str, stdin: Option<&[u8]>, resize: Option<&str>) -> Seen {
    use carapace::streaming::spdy::{Frame, HeaderDecoder, HeaderEncoder, FLAG_FIN};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let rest = url.strip_prefix("http://").unwrap();
    let (addr, path) = rest.split_at(rest.find('/').unwrap());
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\
             X-Stream-Protocol-Version: v4.channel.k8s.io\r\n\
             X-Stream-Protocol-Version: channel.k8s.io\r\nContent-Length: 0\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        assert_eq!(
            tcp.read(&mut byte).await.unwrap(),
            1,
            "response ended early"
        );
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains("x-stream-protocol-version: v4.channel.k8s.io"),
        "{head}"
    );

    let mut enc = HeaderEncoder::new();
    let mut dec = HeaderDecoder::new();
    // A terminal has one output stream.
    let mut roles = vec![(1u32, "error"), (3, "stdout")];
    if resize.is_none() {
        roles.push((5, "stderr"));
    }
    if stdin.is_some() {
        roles.push((7, "stdin"));
    }
    if resize.is_some() {
        roles.push((9, "resize"));
    }
    for (id, role) in &roles {
        let block = enc.encode(&[("streamType", role)]).unwrap();
        let frame = Frame::SynStream {
            stream_id: *id,
            associated: 0,
            priority: 0,
            flags: 0,
            block,
        };
        tcp.write_all(&frame.encode()).await.unwrap();
    }
    if let Some(size) = resize {
        // Split in two frames: the server must reassemble JSON objects.
        let (a, b) = size.as_bytes().split_at(size.len() / 2);
        for part in [a, b] {
            let frame = Frame::Data {
                stream_id: 9,
                flags: 0,
                data: part.to_vec(),
            };
            tcp.write_all(&frame.encode()).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    if let Some(data) = stdin {
        let frame = Frame::Data {
            stream_id: 7,
            flags: FLAG_FIN,
            data: data.to_vec(),
        };
        tcp.write_all(&frame.encode()).await.unwrap();
    }
    let mut seen = Seen::default();
    let mut replies = 0;
    let mut buf = Vec::new();
    let read = async {
        loop {
            while let Some((frame, used)) = Frame::parse(&buf).expect("a valid frame") {
                buf.drain(..used);
                match frame {
                    Frame::SynReply { block, .. } => {
                        dec.decode(&block).expect("a reply header block");
                        replies += 1;
                    }
                    Frame::Data {
                        stream_id,
                        flags,
                        data,
                    } => {
                        let text = String::from_utf8_lossy(&data);
                        match stream_id {
                            1 => seen.status.push_str(&text),
                            3 => seen.stdout.push_str(&text),
                            5 => seen.stderr.push_str(&text),
                            other => panic!("data on stream {other}"),
                        }
                        if stream_id == 1 && flags & FLAG_FIN != 0 {
                            return;
                        }
                    }
                    _ => {}
                }
            }
            let mut chunk = [0u8; 4096];
            let n = tcp.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the connection closed before the error stream ended");
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("the SPDY session ended");
    assert_eq!(replies, roles.len(), "one SYN_REPLY per stream");
    seen
}

/// Decodes a query value (`+` and `%XX`).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

/// An API server that knows one running pod `stream` and forwards its exec
/// requests (WebSocket or SPDY) to the streaming server, for `container`.
async fn fake_apiserver(cri: Cri, containers: HashMap<String, String>) -> std::net::SocketAddr {
    fake_apiserver::serve(move |req: ApiRequest| {
        let mut cri = cri.clone();
        let containers = containers.clone();
        async move {
            let kind = req
                .path
                .strip_prefix("/api/v1/namespaces/default/pods/stream/");
            if kind == Some("exec") || kind == Some("attach") {
                let mut request = ExecRequest::default();
                for (k, v) in req.query.split('&').filter_map(|kv| kv.split_once('=')) {
                    let v = unescape(v);
                    match k {
                        "command" => request.cmd.push(v),
                        "container" => request.container_id = containers[&v].clone(),
                        "stdin" => request.stdin = v == "true",
                        "stdout" => request.stdout = v == "true",
                        "stderr" => request.stderr = v == "true",
                        "tty" => request.tty = v == "true",
                        _ => {}
                    }
                }
                let url = if kind == Some("exec") {
                    cri.exec(request).await.expect("Exec").into_inner().url
                } else {
                    cri.attach(AttachRequest {
                        container_id: request.container_id,
                        stdin: request.stdin,
                        tty: request.tty,
                        stdout: request.stdout,
                        stderr: request.stderr,
                    })
                    .await
                    .expect("Attach")
                    .into_inner()
                    .url
                };
                return ApiReply::Stream(url);
            }
            match req.path.as_str() {
                "/api/v1/namespaces/default/pods/stream" => ApiReply::Json(
                    r#"{"kind":"Pod","apiVersion":"v1","metadata":{"name":"stream","namespace":"default"},"spec":{"containers":[{"name":"app","image":"busybox"},{"name":"echoer","image":"busybox","stdin":true}]},"status":{"phase":"Running"}}"#.into(),
                ),
                // Discovery, the legacy (unaggregated) way.
                path => fake_apiserver::discovery(
                    path,
                    r#"{"name":"pods","singularName":"pod","namespaced":true,"kind":"Pod","verbs":["get","list"],"shortNames":["po"]},{"name":"pods/exec","singularName":"","namespaced":true,"kind":"PodExecOptions","verbs":["create","get"]}"#,
                )
                .map_or(ApiReply::NotFound, ApiReply::Json),
            }
        }
    })
    .await
}
