//! `netbench`: the TCP measuring program of the pod network benchmark
//! (`e2e/benches/pod_network.rs`). Standard library only, built static so
//! that it runs unchanged inside a busybox container in a pod VM and in a
//! plain network namespace on the host.
//!
//! ```text
//! netbench server <port>
//!     accepts connections forever; the first byte of each says what it is:
//!     `T` sink everything until EOF, then answer the byte count (8 bytes,
//!     big-endian); `R` echo 1-byte pings until EOF
//! netbench client <ip> <port> throughput <MiB>
//!     pushes <MiB> MiB and waits for the server's count (so the time covers
//!     delivery, not only the local send buffer); prints
//!     `throughput_mib_s <x>`
//! netbench client <ip> <port> rr <count>
//!     <count> 1-byte round trips (after 20 unmeasured ones) with
//!     TCP_NODELAY; prints `rtt_us_mean <x>` (the whole run's time over
//!     <count>), `rtt_us_median <x>`, `rtt_us_p99 <x>`
//! ```
//!
//! The client retries its connection for 30 s (the server may still be
//! starting). Every failure is an error exit with a message: nothing is
//! printed that was not measured.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

const CHUNK: usize = 128 * 1024;

fn usage() -> ExitCode {
    eprintln!(
        "usage: netbench server <port> | client <ip> <port> throughput <MiB> | client <ip> <port> rr <count>"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["server", port] => match port.parse() {
            Ok(port) => server(port),
            Err(_) => return usage(),
        },
        ["client", ip, port, mode, n] => {
            let (Ok(port), Ok(n)) = (port.parse::<u16>(), n.parse::<u64>()) else {
                return usage();
            };
            match *mode {
                "throughput" if n > 0 => throughput(ip, port, n),
                "rr" if n > 0 => round_trips(ip, port, n),
                _ => return usage(),
            }
        }
        _ => return usage(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netbench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn server(port: u16) -> std::io::Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port))?;
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        std::thread::spawn(move || {
            if let Err(e) = serve(conn) {
                eprintln!("netbench server: connection: {e}");
            }
        });
    }
    Ok(())
}

fn serve(mut conn: TcpStream) -> std::io::Result<()> {
    let mut mode = [0u8; 1];
    conn.read_exact(&mut mode)?;
    match mode[0] {
        b'T' => {
            let mut buf = vec![0u8; CHUNK];
            let mut total: u64 = 0;
            loop {
                let n = conn.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            conn.write_all(&total.to_be_bytes())
        }
        b'R' => {
            conn.set_nodelay(true)?;
            let mut ping = [0u8; 1];
            loop {
                match conn.read(&mut ping)? {
                    0 => return Ok(()),
                    _ => conn.write_all(&ping)?,
                }
            }
        }
        other => Err(std::io::Error::other(format!("unknown mode byte {other}"))),
    }
}

fn connect(ip: &str, port: u16) -> std::io::Result<TcpStream> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match TcpStream::connect((ip, port)) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => {
                return Err(std::io::Error::other(format!(
                    "connecting to {ip}:{port}: {e}"
                )))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

fn throughput(ip: &str, port: u16, mib: u64) -> std::io::Result<()> {
    let mut conn = connect(ip, port)?;
    let buf = vec![0x5au8; CHUNK];
    let total = mib * 1024 * 1024;
    let start = Instant::now();
    conn.write_all(b"T")?;
    let mut sent: u64 = 0;
    while sent < total {
        let n = (total - sent).min(CHUNK as u64) as usize;
        conn.write_all(&buf[..n])?;
        sent += n as u64;
    }
    conn.shutdown(Shutdown::Write)?;
    let mut count = [0u8; 8];
    conn.read_exact(&mut count)?;
    let elapsed = start.elapsed();
    let received = u64::from_be_bytes(count);
    if received != total {
        return Err(std::io::Error::other(format!(
            "the server received {received} bytes of {total}"
        )));
    }
    println!("throughput_mib_s {:.1}", mib as f64 / elapsed.as_secs_f64());
    Ok(())
}

fn round_trips(ip: &str, port: u16, count: u64) -> std::io::Result<()> {
    const WARMUP: u64 = 20;
    let mut conn = connect(ip, port)?;
    conn.set_nodelay(true)?;
    conn.write_all(b"R")?;
    let mut times = Vec::with_capacity(count as usize);
    let mut pong = [0u8; 1];
    let mut measured = Instant::now();
    for i in 0..WARMUP + count {
        if i == WARMUP {
            measured = Instant::now();
        }
        let ping = [(i % 251) as u8];
        let start = Instant::now();
        conn.write_all(&ping)?;
        conn.read_exact(&mut pong)?;
        let rtt = start.elapsed();
        if pong != ping {
            return Err(std::io::Error::other("the echo differs from the ping"));
        }
        if i >= WARMUP {
            times.push(rtt);
        }
    }
    let mean = measured.elapsed().as_secs_f64() / count as f64;
    times.sort();
    let at = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize];
    println!("rtt_us_mean {:.1}", mean * 1e6);
    println!("rtt_us_median {:.1}", at(0.5).as_secs_f64() * 1e6);
    println!("rtt_us_p99 {:.1}", at(0.99).as_secs_f64() * 1e6);
    Ok(())
}
