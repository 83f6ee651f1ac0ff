//! The host side of hybrid vsock: one unix listener at `uds_path` for host-initiated
//! connections (`CONNECT <port>\n` → `OK <local port>\n`), unix connections to
//! `<uds_path>_<port>` for guest-initiated ones, and the routing of packets between the
//! guest and those streams. Everything is nonblocking and driven by one epoll set whose fd
//! the VMM's event loop watches.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::{ConnState, Connection, ReadOutcome};
use super::metrics::VsockMetrics;
use super::packet::{op, Packet, PacketHeader, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
use super::HOST_CID;

/// Most connections (established or being set up) at once: bounds what a guest or a host
/// client can make us hold (each holds at most `CONN_BUF_SIZE` of guest data).
pub const MAX_CONNECTIONS: usize = 256;
/// Most control packets waiting for guest receive buffers.
pub const MAX_PENDING_CTRL: usize = 4 * MAX_CONNECTIONS;
/// Longest `CONNECT <port>\n` line we read.
const MAX_CONNECT_LINE: usize = 32;
/// First port handed to host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

type Key = (u32, u32); // (local port, peer port)

/// A control packet to send to the guest; the header is built when it is sent, so it
/// carries the connection's credit at that time.
#[derive(Debug, Clone, Copy)]
enum Ctrl {
    Conn { key: Key, op: u16, flags: u32 },
    Rst { local: u32, peer: u32 },
}

/// A host client that connected but has not finished its `CONNECT` line.
#[derive(Debug)]
struct PendingConnect {
    stream: UnixStream,
    line: Vec<u8>,
}

/// The hybrid-vsock backend.
#[derive(Debug)]
pub struct VsockMuxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    pending: HashMap<RawFd, PendingConnect>,
    conns: HashMap<Key, Connection>,
    by_fd: HashMap<RawFd, Key>,
    ctrl: VecDeque<Ctrl>,
    readable: VecDeque<Key>,
    next_local_port: u32,
    metrics: Arc<VsockMetrics>,
}

impl VsockMuxer {
    /// Binds `uds_path` and prepares the epoll set.
    pub fn new(
        guest_cid: u64,
        uds_path: &Path,
        metrics: Arc<VsockMetrics>,
    ) -> std::io::Result<Self> {
        let listener = UnixListener::bind(uds_path)?;
        let cleanup = |e| {
            let _ = std::fs::remove_file(uds_path);
            e
        };
        listener.set_nonblocking(true).map_err(cleanup)?;
        let epoll = Epoll::new().map_err(cleanup)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, listener.as_raw_fd() as u64),
            )
            .map_err(cleanup)?;
        Ok(Self {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            epoll,
            pending: HashMap::new(),
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            ctrl: VecDeque::new(),
            readable: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            metrics,
        })
    }

    /// The epoll fd the VMM's event loop watches.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Number of live connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Whether a packet waits for a guest receive buffer.
    pub fn has_rx(&self) -> bool {
        !self.ctrl.is_empty() || !self.readable.is_empty()
    }

    fn push_ctrl(&mut self, c: Ctrl) {
        if self.ctrl.len() >= MAX_PENDING_CTRL {
            self.metrics.ctrl_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.ctrl.push_back(c);
    }

    fn push_rst_to(&mut self, hdr: &PacketHeader) {
        if hdr.op != op::RST {
            self.push_ctrl(Ctrl::Rst {
                local: hdr.dst_port,
                peer: hdr.src_port,
            });
        }
    }

    /// Brings the epoll registration of connection `key` in line with what it needs.
    fn update_interest(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let wanted = conn.wanted_events();
        let fd = conn.stream.as_raw_fd();
        let op = match (conn.registered, wanted.is_empty()) {
            (None, true) => return,
            (Some(_), true) => ControlOperation::Delete,
            (None, false) => ControlOperation::Add,
            (Some(cur), false) if cur == wanted => return,
            (Some(_), false) => ControlOperation::Modify,
        };
        if self
            .epoll
            .ctl(op, fd, EpollEvent::new(wanted, fd as u64))
            .is_ok()
        {
            conn.registered = (!wanted.is_empty()).then_some(wanted);
        }
    }

    fn add_connection(&mut self, conn: Connection) -> Key {
        let key = (conn.local_port, conn.peer_port);
        self.by_fd.insert(conn.stream.as_raw_fd(), key);
        self.conns.insert(key, conn);
        self.metrics.conns_added.fetch_add(1, Ordering::Relaxed);
        self.update_interest(key);
        key
    }

    fn remove_connection(&mut self, key: Key) -> Option<Connection> {
        let conn = self.conns.remove(&key)?;
        let fd = conn.stream.as_raw_fd();
        if conn.registered.is_some() {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        self.by_fd.remove(&fd);
        self.metrics.conns_removed.fetch_add(1, Ordering::Relaxed);
        Some(conn)
    }

    /// Drops a connection and tells the guest.
    fn reset_connection(&mut self, key: Key) {
        if self.remove_connection(key).is_some() {
            self.metrics.conn_errors.fetch_add(1, Ordering::Relaxed);
            self.push_ctrl(Ctrl::Rst {
                local: key.0,
                peer: key.1,
            });
        }
    }

    /// Writes out buffered guest data, sending a credit update when the guest needs one.
    fn flush_connection(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        match conn.flush() {
            Ok(_) => {
                if conn.needs_credit_update() {
                    self.push_ctrl(Ctrl::Conn {
                        key,
                        op: op::CREDIT_UPDATE,
                        flags: 0,
                    });
                }
                self.update_interest(key);
            }
            Err(_) => self.reset_connection(key),
        }
    }

    /// A packet from the guest's transmit queue.
    pub fn send_to_host(&mut self, pkt: Packet) {
        let h = pkt.hdr;
        if h.src_cid != self.guest_cid || h.dst_cid != HOST_CID {
            self.metrics.bad_packets.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if h.type_ != TYPE_STREAM {
            self.metrics.bad_packets.fetch_add(1, Ordering::Relaxed);
            self.push_rst_to(&h);
            return;
        }
        let key = (h.dst_port, h.src_port);
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.update_peer_credit(&h);
        }
        let known = self.conns.contains_key(&key);
        match h.op {
            op::REQUEST if !known => self.connect_to_host_listener(&h),
            op::RESPONSE if known => {
                let conn = self.conns.get_mut(&key).expect("known");
                if conn.state == ConnState::LocalInit {
                    conn.state = ConnState::Established;
                    conn.queue_ok_line();
                    self.flush_connection(key);
                } else {
                    self.reset_connection(key);
                }
            }
            op::RW if known => {
                let conn = self.conns.get_mut(&key).expect("known");
                if conn.state != ConnState::Established || conn.peer_shutdown & SHUTDOWN_SEND != 0 {
                    self.reset_connection(key);
                    return;
                }
                match conn.recv_from_guest(&pkt.data) {
                    Ok(()) => self.flush_connection(key),
                    Err(_) => self.reset_connection(key),
                }
            }
            op::CREDIT_UPDATE if known => self.update_interest(key),
            op::CREDIT_REQUEST if known => self.push_ctrl(Ctrl::Conn {
                key,
                op: op::CREDIT_UPDATE,
                flags: 0,
            }),
            op::SHUTDOWN if known => {
                let conn = self.conns.get_mut(&key).expect("known");
                conn.peer_shutdown |= h.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                if conn.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND || conn.host_eof {
                    // Best effort: pass on what we hold, then close and confirm with RST.
                    let _ = conn.flush();
                    self.remove_connection(key);
                    self.push_ctrl(Ctrl::Rst {
                        local: key.0,
                        peer: key.1,
                    });
                } else {
                    self.flush_connection(key);
                }
            }
            op::RST if known => {
                self.remove_connection(key);
            }
            op::RST => {}
            _ => {
                // Unknown op, or an op for a connection that does not exist (or REQUEST
                // for one that does).
                self.metrics.bad_packets.fetch_add(1, Ordering::Relaxed);
                if known {
                    self.reset_connection(key);
                } else {
                    self.push_rst_to(&h);
                }
            }
        }
    }

    /// The guest connects to host port P: connect to the listener at `<uds_path>_P`.
    fn connect_to_host_listener(&mut self, h: &PacketHeader) {
        if self.conns.len() + self.pending.len() >= MAX_CONNECTIONS {
            self.metrics.conn_errors.fetch_add(1, Ordering::Relaxed);
            self.push_rst_to(h);
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", h.dst_port));
        let stream = match UnixStream::connect(&path) {
            Ok(s) if s.set_nonblocking(true).is_ok() => s,
            _ => {
                self.metrics.conn_errors.fetch_add(1, Ordering::Relaxed);
                self.push_rst_to(h);
                return;
            }
        };
        let mut conn = Connection::new(
            stream,
            ConnState::Established,
            self.guest_cid,
            h.dst_port,
            h.src_port,
        );
        conn.update_peer_credit(h);
        let key = self.add_connection(conn);
        self.push_ctrl(Ctrl::Conn {
            key,
            op: op::RESPONSE,
            flags: 0,
        });
    }

    /// The next packet for the guest, with at most `max_payload` payload bytes.
    pub fn next_rx(&mut self, max_payload: usize) -> Option<(PacketHeader, Vec<u8>)> {
        while let Some(c) = self.ctrl.pop_front() {
            match c {
                Ctrl::Rst { local, peer } => {
                    self.metrics.rst_sent.fetch_add(1, Ordering::Relaxed);
                    let hdr = PacketHeader {
                        src_cid: HOST_CID,
                        dst_cid: self.guest_cid,
                        src_port: local,
                        dst_port: peer,
                        type_: TYPE_STREAM,
                        op: op::RST,
                        ..Default::default()
                    };
                    return Some((hdr, Vec::new()));
                }
                Ctrl::Conn { key, op, flags } => {
                    if let Some(conn) = self.conns.get_mut(&key) {
                        return Some((conn.header(op, flags, 0), Vec::new()));
                    }
                }
            }
        }
        while let Some(&key) = self.readable.front() {
            let Some(conn) = self.conns.get_mut(&key) else {
                self.readable.pop_front();
                continue;
            };
            if !conn.can_send() {
                // Blocked on credit (or closing): wait for a credit update.
                conn.input_pending = false;
                self.readable.pop_front();
                self.update_interest(key);
                continue;
            }
            match conn.read_host(max_payload) {
                ReadOutcome::Data(data) => {
                    let hdr = conn.header(op::RW, 0, data.len() as u32);
                    return Some((hdr, data));
                }
                ReadOutcome::WouldBlock => {
                    conn.input_pending = false;
                    self.readable.pop_front();
                    self.update_interest(key);
                }
                ReadOutcome::Eof => {
                    conn.input_pending = false;
                    conn.host_eof = true;
                    self.readable.pop_front();
                    let hdr = conn.header(op::SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND, 0);
                    self.update_interest(key);
                    return Some((hdr, Vec::new()));
                }
                ReadOutcome::Error => {
                    self.readable.pop_front();
                    self.reset_connection(key);
                }
            }
        }
        None
    }

    /// Handles whatever the epoll set reports, without blocking.
    pub fn process_events(&mut self) {
        let mut events = [EpollEvent::default(); 32];
        // Handling an event can make another fd ready (an accepted client's CONNECT line),
        // so go round until nothing is ready; bounded, in case an fd stays ready whatever
        // we do (the main loop calls again while the epoll fd is readable).
        for _ in 0..16 {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            if n == 0 {
                return;
            }
            for ev in &events[..n] {
                let fd = ev.fd();
                let set = ev.event_set();
                if fd == self.listener.as_raw_fd() {
                    self.accept_all();
                } else if self.pending.contains_key(&fd) {
                    self.read_connect_line(fd);
                } else if let Some(&key) = self.by_fd.get(&fd) {
                    self.connection_event(key, set);
                }
            }
        }
    }

    fn connection_event(&mut self, key: Key, set: EventSet) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if set.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR)
            && conn.registered.is_some_and(|r| r.contains(EventSet::OUT))
        {
            self.flush_connection(key);
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR)
            && conn.registered.is_some_and(|r| r.contains(EventSet::IN))
        {
            conn.input_pending = true;
            self.readable.push_back(key);
            self.update_interest(key);
        }
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.conns.len() + self.pending.len() >= MAX_CONNECTIONS
                        || stream.set_nonblocking(true).is_err()
                    {
                        self.metrics.conn_errors.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    let ev = EpollEvent::new(EventSet::IN, fd as u64);
                    if self.epoll.ctl(ControlOperation::Add, fd, ev).is_ok() {
                        self.pending.insert(
                            fd,
                            PendingConnect {
                                stream,
                                line: Vec::new(),
                            },
                        );
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return,
            }
        }
    }

    /// Reads the `CONNECT` line byte by byte, so that data sent right after it stays in
    /// the socket for the connection.
    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(p) = self.pending.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8; 1];
        let done = loop {
            match p.stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break Some(true),
                Ok(1) if p.line.len() < MAX_CONNECT_LINE => p.line.push(byte[0]),
                Ok(_) => break Some(false),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break None,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break Some(false),
            }
        };
        let Some(ok) = done else {
            return;
        };
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        let p = self.pending.remove(&fd).expect("pending");
        let port = ok.then(|| parse_connect(&p.line)).flatten();
        let Some(port) = port else {
            self.metrics.conn_errors.fetch_add(1, Ordering::Relaxed);
            return; // Dropping the stream closes it.
        };
        let local = self.alloc_local_port(port);
        let conn = Connection::new(p.stream, ConnState::LocalInit, self.guest_cid, local, port);
        let key = self.add_connection(conn);
        self.push_ctrl(Ctrl::Conn {
            key,
            op: op::REQUEST,
            flags: 0,
        });
    }

    fn alloc_local_port(&mut self, peer: u32) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(p, peer)) {
                return p;
            }
        }
    }
}

impl Drop for VsockMuxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

/// Parses `CONNECT <port>` (the newline already stripped).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let port = text.strip_prefix("CONNECT ")?.trim_end_matches('\r');
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_line_parsing() {
        assert_eq!(parse_connect(b"CONNECT 1024"), Some(1024));
        assert_eq!(parse_connect(b"CONNECT 1024\r"), Some(1024));
        assert_eq!(parse_connect(b"CONNECT "), None);
        assert_eq!(parse_connect(b"CONNECT -1"), None);
        assert_eq!(parse_connect(b"CONNECT 99999999999"), None);
        assert_eq!(parse_connect(b"connect 1"), None);
        assert_eq!(parse_connect(b"\xff"), None);
    }
}
