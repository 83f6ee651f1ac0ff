//! Vsock packets in guest memory: a 44-byte little-endian header, then `len` payload bytes,
//! laid out over a descriptor chain of any shape (header and payload in one descriptor, or
//! both split over several). Every field is guest input and is checked before use.

use std::io::{Read, Write};

use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;

use crate::devices::virtio::queue::{validate_chain, ChainError, Direction};

/// Size of the packet header.
pub const HDR_SIZE: usize = 44;
/// Largest payload we accept from or give to the guest in one packet (Linux's
/// `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PKT_PAYLOAD: usize = 64 * 1024;

/// `type` of a stream socket (the only type we support).
pub const TYPE_STREAM: u16 = 1;

/// Packet operations.
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Reset / refused.
    pub const RST: u16 = 3;
    /// Half or full close.
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// Here is my credit.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Tell me your credit.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// `SHUTDOWN` flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// `SHUTDOWN` flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// The packet header, decoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PacketHeader {
    /// Source context id.
    pub src_cid: u64,
    /// Destination context id.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags.
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer.
    pub fwd_cnt: u32,
}

impl PacketHeader {
    /// Decodes the wire format.
    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default());
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap_or_default());
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes the wire format.
    pub fn to_bytes(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// A packet taken from the guest's transmit queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// The header.
    pub hdr: PacketHeader,
    /// Exactly `hdr.len` bytes.
    pub data: Vec<u8>,
}

/// Why a chain did not hold a usable packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// The descriptor chain itself is malformed.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// Fewer bytes than a header.
    #[error("descriptor chain of {0} bytes cannot hold a packet header")]
    TooShort(u64),
    /// The header claims more payload than we accept.
    #[error("payload length {0} exceeds the maximum")]
    PayloadTooLong(u32),
    /// The header claims more payload than the chain holds.
    #[error("payload length {len} exceeds the {avail} bytes in the chain")]
    Truncated {
        /// Claimed.
        len: u32,
        /// Present.
        avail: u64,
    },
    /// Guest memory could not be accessed.
    #[error("cannot access guest memory")]
    Memory,
}

type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;

/// Reads a packet from a transmit (device-readable) chain.
pub fn read_tx_packet(mem: &GuestMemoryMmap, chain: Chain<'_>) -> Result<Packet, PacketError> {
    let max = (HDR_SIZE + MAX_PKT_PAYLOAD) as u64;
    let total = match validate_chain(&chain, Direction::DeviceReads, max) {
        // A chain longer than any packet is fine as long as the header's length fits:
        // it is rejected below if it claims too much.
        Err(ChainError::TooLong(_)) => validate_chain(&chain, Direction::DeviceReads, u64::MAX)?,
        other => other?,
    };
    if total < HDR_SIZE as u64 {
        return Err(PacketError::TooShort(total));
    }
    let mut reader = chain.reader(mem).map_err(|_| PacketError::Memory)?;
    let mut raw = [0u8; HDR_SIZE];
    reader
        .read_exact(&mut raw)
        .map_err(|_| PacketError::Memory)?;
    let hdr = PacketHeader::from_bytes(&raw);
    if hdr.len as usize > MAX_PKT_PAYLOAD {
        return Err(PacketError::PayloadTooLong(hdr.len));
    }
    let avail = total - HDR_SIZE as u64;
    if u64::from(hdr.len) > avail {
        return Err(PacketError::Truncated {
            len: hdr.len,
            avail,
        });
    }
    let mut data = vec![0u8; hdr.len as usize];
    reader
        .read_exact(&mut data)
        .map_err(|_| PacketError::Memory)?;
    Ok(Packet { hdr, data })
}

/// Checks a receive (device-writable) chain; returns how many payload bytes fit after the
/// header.
pub fn rx_payload_capacity(chain: &Chain<'_>) -> Result<usize, PacketError> {
    let total = validate_chain(chain, Direction::DeviceWrites, u64::from(u32::MAX))?;
    let cap = total
        .checked_sub(HDR_SIZE as u64)
        .ok_or(PacketError::TooShort(total))?;
    Ok((cap as usize).min(MAX_PKT_PAYLOAD))
}

/// Writes a packet into a receive chain already checked by [`rx_payload_capacity`]; returns
/// the bytes written. `data` must fit.
pub fn write_rx_packet(
    mem: &GuestMemoryMmap,
    chain: Chain<'_>,
    hdr: &PacketHeader,
    data: &[u8],
) -> Result<u32, PacketError> {
    let mut writer = chain.writer(mem).map_err(|_| PacketError::Memory)?;
    writer
        .write_all(&hdr.to_bytes())
        .map_err(|_| PacketError::Memory)?;
    writer.write_all(data).map_err(|_| PacketError::Memory)?;
    Ok((HDR_SIZE + data.len()) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    fn hdr(len: u32) -> PacketHeader {
        PacketHeader {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1000,
            dst_port: 1024,
            len,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        }
    }

    fn raw(addr: u64, len: u32, flags: u32) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, 0))
    }

    #[test]
    fn header_round_trips() {
        let h = hdr(5);
        assert_eq!(PacketHeader::from_bytes(&h.to_bytes()), h);
    }

    #[test]
    fn packet_in_one_descriptor_or_split_anywhere() {
        let m = mem();
        let mut bytes = hdr(10).to_bytes().to_vec();
        bytes.extend_from_slice(b"0123456789");
        // One descriptor.
        m.write_slice(&bytes, GuestAddress(0x10_0000)).unwrap();
        let q = MockSplitQueue::new(&m, 16);
        let chain = q.build_desc_chain(&[raw(0x10_0000, 54, 0)]).unwrap();
        let p = read_tx_packet(&m, chain).unwrap();
        assert_eq!((p.hdr, &p.data[..]), (hdr(10), &b"0123456789"[..]));
        // Split inside the header and inside the payload, 4 descriptors.
        let parts = [
            (0x20_0000u64, 0..20),
            (0x21_0000, 20..44),
            (0x22_0000, 44..47),
            (0x23_0000, 47..54),
        ];
        let descs: Vec<_> = parts
            .iter()
            .map(|(a, r)| {
                m.write_slice(&bytes[r.clone()], GuestAddress(*a)).unwrap();
                raw(*a, r.len() as u32, 0)
            })
            .collect();
        let q = MockSplitQueue::new(&m, 16);
        let p = read_tx_packet(&m, q.build_desc_chain(&descs).unwrap()).unwrap();
        assert_eq!(&p.data[..], b"0123456789");
    }

    #[test]
    fn bad_headers_are_rejected() {
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        let chain = q.build_desc_chain(&[raw(0x10_0000, 20, 0)]).unwrap();
        assert_eq!(read_tx_packet(&m, chain), Err(PacketError::TooShort(20)));
        m.write_slice(&hdr(100).to_bytes(), GuestAddress(0x10_0000))
            .unwrap();
        let chain = q.build_desc_chain(&[raw(0x10_0000, 54, 0)]).unwrap();
        assert_eq!(
            read_tx_packet(&m, chain),
            Err(PacketError::Truncated {
                len: 100,
                avail: 10
            })
        );
        m.write_slice(&hdr(u32::MAX).to_bytes(), GuestAddress(0x10_0000))
            .unwrap();
        let chain = q.build_desc_chain(&[raw(0x10_0000, 0x2_0000, 0)]).unwrap();
        assert_eq!(
            read_tx_packet(&m, chain),
            Err(PacketError::PayloadTooLong(u32::MAX))
        );
        let chain = q
            .build_desc_chain(&[raw(0x10_0000, 54, VRING_DESC_F_WRITE)])
            .unwrap();
        assert_eq!(
            read_tx_packet(&m, chain),
            Err(PacketError::Chain(ChainError::WrongDirection))
        );
    }

    #[test]
    fn rx_write_spans_descriptors() {
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        let w = VRING_DESC_F_WRITE;
        let chain = q
            .build_desc_chain(&[raw(0x10_0000, 30, w), raw(0x11_0000, 30, w)])
            .unwrap();
        assert_eq!(rx_payload_capacity(&chain).unwrap(), 16);
        assert_eq!(write_rx_packet(&m, chain, &hdr(3), b"abc").unwrap(), 47);
        let mut back = [0u8; 17];
        m.read_slice(&mut back, GuestAddress(0x11_0000)).unwrap();
        assert_eq!(&back[14..17], b"abc");
        let short = q.build_desc_chain(&[raw(0x10_0000, 40, w)]).unwrap();
        assert_eq!(rx_payload_capacity(&short), Err(PacketError::TooShort(40)));
    }
}
