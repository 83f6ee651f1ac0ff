//! One vsock stream connection between a guest port and a host unix stream, with virtio
//! credit-based flow control in both directions (virtio 1.2 §5.10.6.3).

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use vmm_sys_util::epoll::EventSet;

use super::packet::{PacketHeader, MAX_PKT_PAYLOAD, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
use super::HOST_CID;

/// Receive buffer we advertise per connection: the most guest data we ever hold for it.
pub const CONN_BUF_SIZE: u32 = 256 * 1024;

/// Connection life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// The host connected and sent `CONNECT`; our REQUEST awaits the guest's RESPONSE.
    LocalInit,
    /// Data flows.
    Established,
}

/// What reading the host stream produced.
#[derive(Debug)]
pub enum ReadOutcome {
    /// Some bytes.
    Data(Vec<u8>),
    /// Nothing now.
    WouldBlock,
    /// The host closed its side.
    Eof,
    /// The stream failed.
    Error,
}

/// Why a connection must be reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnError {
    /// The guest sent more than the credit we gave it.
    #[error("guest exceeded its credit")]
    CreditViolation,
    /// Writing to the host stream failed.
    #[error("host stream write failed")]
    HostWrite,
}

/// A connection.
#[derive(Debug)]
pub struct Connection {
    /// The host side.
    pub stream: UnixStream,
    /// Where it is in its life.
    pub state: ConnState,
    /// Host-side port (the CONNECT-allocated port, or the guest's destination port).
    pub local_port: u32,
    /// Guest-side port.
    pub peer_port: u32,
    guest_cid: u64,
    // Host -> guest flow.
    tx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    // Guest -> host flow.
    rx_cnt: Wrapping<u32>,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    write_buf: VecDeque<u8>,
    /// Bytes at the front of `write_buf` that are ours (the `OK` line), not guest data.
    uncounted: usize,
    /// The stream is readable (or at EOF) and has not been drained yet.
    pub input_pending: bool,
    /// The interest currently registered with the muxer's epoll, if any.
    pub registered: Option<EventSet>,
    /// SHUTDOWN flags the guest sent.
    pub peer_shutdown: u32,
    /// The host closed its side; we told the guest and wait for its RST.
    pub host_eof: bool,
    write_shut: bool,
}

impl Connection {
    /// A connection in `state`.
    pub fn new(
        stream: UnixStream,
        state: ConnState,
        guest_cid: u64,
        local_port: u32,
        peer_port: u32,
    ) -> Self {
        Self {
            stream,
            state,
            local_port,
            peer_port,
            guest_cid,
            tx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            write_buf: VecDeque::new(),
            uncounted: 0,
            input_pending: false,
            registered: None,
            peer_shutdown: 0,
            host_eof: false,
            write_shut: false,
        }
    }

    /// A header from us to the guest for this connection; it carries our current credit.
    pub fn header(&mut self, op: u16, flags: u32, len: u32) -> PacketHeader {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        PacketHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// Takes the guest's credit information from any packet it sent.
    pub fn update_peer_credit(&mut self, hdr: &PacketHeader) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
    }

    /// How many bytes the guest can take now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether host data may be sent to the guest.
    pub fn can_send(&self) -> bool {
        self.state == ConnState::Established
            && !self.host_eof
            && self.peer_shutdown & SHUTDOWN_RCV == 0
            && self.peer_credit() > 0
    }

    /// The epoll interest this connection needs now.
    pub fn wanted_events(&self) -> EventSet {
        let mut set = EventSet::empty();
        if self.can_send() && !self.input_pending {
            set |= EventSet::IN;
        }
        if !self.write_buf.is_empty() {
            set |= EventSet::OUT;
        }
        set
    }

    /// Queues the `OK <port>\n` line the host waits for after `CONNECT`.
    pub fn queue_ok_line(&mut self) {
        let line = format!("OK {}\n", self.local_port);
        self.uncounted += line.len();
        self.write_buf.extend(line.as_bytes());
    }

    /// Accepts guest data, within the credit we advertised.
    pub fn recv_from_guest(&mut self, data: &[u8]) -> Result<(), ConnError> {
        let held = self.write_buf.len() - self.uncounted;
        if held + data.len() > CONN_BUF_SIZE as usize {
            return Err(ConnError::CreditViolation);
        }
        self.write_buf.extend(data);
        self.rx_cnt += Wrapping(data.len() as u32);
        Ok(())
    }

    /// Writes buffered guest data to the host stream; returns guest bytes forwarded.
    pub fn flush(&mut self) -> Result<usize, ConnError> {
        let mut forwarded = 0;
        while !self.write_buf.is_empty() {
            let (front, _) = self.write_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(ConnError::HostWrite),
                Ok(n) => {
                    self.write_buf.drain(..n);
                    let ours = n.min(self.uncounted);
                    self.uncounted -= ours;
                    forwarded += n - ours;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return Err(ConnError::HostWrite),
            }
        }
        self.fwd_cnt += Wrapping(forwarded as u32);
        if self.write_buf.is_empty() && self.peer_shutdown & SHUTDOWN_SEND != 0 && !self.write_shut
        {
            // The guest sends no more: pass the half-close on to the host.
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
            self.write_shut = true;
        }
        Ok(forwarded)
    }

    /// Whether the guest's view of our free buffer is low enough to send it a credit update.
    pub fn needs_credit_update(&self) -> bool {
        let unacked_by_us = (self.rx_cnt - self.last_fwd_cnt_sent).0;
        let guest_view_free = CONN_BUF_SIZE.saturating_sub(unacked_by_us);
        self.fwd_cnt != self.last_fwd_cnt_sent && guest_view_free < CONN_BUF_SIZE / 2
    }

    /// Reads at most `max` bytes (bounded by the peer's credit) from the host stream.
    pub fn read_host(&mut self, max: usize) -> ReadOutcome {
        let n = max.min(self.peer_credit() as usize).min(MAX_PKT_PAYLOAD);
        if n == 0 {
            return ReadOutcome::WouldBlock;
        }
        let mut buf = vec![0u8; n];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return ReadOutcome::Eof,
                Ok(got) => {
                    buf.truncate(got);
                    self.tx_cnt += Wrapping(got as u32);
                    return ReadOutcome::Data(buf);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return ReadOutcome::WouldBlock,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return ReadOutcome::Error,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::vsock::packet::op;

    fn pair() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        (Connection::new(a, ConnState::Established, 3, 1024, 5000), b)
    }

    #[test]
    fn credit_accounting() {
        let (mut c, mut host) = pair();
        assert_eq!(c.peer_credit(), 0);
        assert!(!c.can_send());
        c.update_peer_credit(&PacketHeader {
            buf_alloc: 10,
            ..Default::default()
        });
        assert_eq!(c.peer_credit(), 10);
        host.write_all(b"0123456789abc").unwrap();
        match c.read_host(100) {
            ReadOutcome::Data(d) => assert_eq!(d, b"0123456789"),
            other => panic!("{other:?}"),
        }
        assert_eq!(c.peer_credit(), 0);
        assert!(matches!(c.read_host(100), ReadOutcome::WouldBlock));
        c.update_peer_credit(&PacketHeader {
            buf_alloc: 10,
            fwd_cnt: 4,
            ..Default::default()
        });
        assert_eq!(c.peer_credit(), 4);
    }

    #[test]
    fn guest_data_within_credit_reaches_host() {
        let (mut c, mut host) = pair();
        c.queue_ok_line();
        c.recv_from_guest(b"hello").unwrap();
        assert_eq!(c.flush().unwrap(), 5);
        let mut buf = [0u8; 64];
        let n = host.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"OK 1024\nhello");
        // fwd_cnt counts only guest bytes.
        assert_eq!(c.header(op::RW, 0, 0).fwd_cnt, 5);
        let big = vec![0u8; CONN_BUF_SIZE as usize + 1];
        assert_eq!(c.recv_from_guest(&big), Err(ConnError::CreditViolation));
    }

    #[test]
    fn credit_update_after_half_the_buffer() {
        let (mut c, mut host) = pair();
        let chunk = vec![7u8; (CONN_BUF_SIZE / 2 + 1) as usize];
        c.recv_from_guest(&chunk).unwrap();
        let mut sink = vec![0u8; chunk.len()];
        let mut forwarded = 0;
        while forwarded < chunk.len() {
            forwarded += c.flush().unwrap();
            let _ = host.read(&mut sink);
        }
        assert!(c.needs_credit_update());
        let _ = c.header(op::CREDIT_UPDATE, 0, 0);
        assert!(!c.needs_credit_update());
    }
}
