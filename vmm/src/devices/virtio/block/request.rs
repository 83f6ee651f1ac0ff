//! One virtio-blk request: a 16-byte header (type, reserved, sector) in device-readable
//! memory, the data (device-readable for writes, device-writable for reads), and a status
//! byte in the last device-writable byte. Every field is guest input: the chain is validated
//! first, sectors and lengths are checked against the disk, and data moves through a
//! fixed-size bounce buffer, so a request never makes us allocate more than that.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;

use super::metrics::BlockMetrics;
use super::SECTOR_SIZE;
use crate::devices::virtio::queue::validate_request_chain;

/// Size of the request header.
pub const REQ_HDR_SIZE: u64 = 16;
/// Longest request chain we serve (header + data + status). Linux issues at most
/// `max_sectors_kb` (1280 KiB by default) per request.
pub const MAX_REQUEST_LEN: u64 = 32 << 20;
/// Bounce buffer size: data moves between guest memory and the file in pieces this big.
const CHUNK: usize = 64 << 10;

/// Request types.
pub mod req_type {
    /// Read sectors.
    pub const IN: u32 = 0;
    /// Write sectors.
    pub const OUT: u32 = 1;
    /// Flush the write cache.
    pub const FLUSH: u32 = 4;
    /// Device id string.
    pub const GET_ID: u32 = 8;
}

/// Status byte values.
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// The request failed.
    pub const IOERR: u8 = 1;
    /// Request type not supported.
    pub const UNSUPP: u8 = 2;
}

/// The backing file of a disk.
#[derive(Debug)]
pub struct Disk {
    /// The open image.
    pub file: File,
    /// Size in sectors (the file size rounded down).
    pub sectors: u64,
    /// Writes are refused.
    pub read_only: bool,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// Byte offset of `len` bytes at `sector`, if the whole range lies on the disk and `len` is
/// a whole number of sectors.
fn disk_range(disk: &Disk, sector: u64, len: u64) -> Option<u64> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        return None;
    }
    let end = sector.checked_add(len / SECTOR_SIZE)?;
    (end <= disk.sectors).then_some(sector * SECTOR_SIZE)
}

/// Serves the request in `chain`. Returns the number of bytes written into the chain (data
/// plus the status byte), or `None` if the chain is malformed and has no status byte to
/// report through (it is then returned unused and counted).
pub fn process(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    disk: &Disk,
    metrics: &BlockMetrics,
) -> Option<u32> {
    let invalid = |why: &str| {
        tracing::debug!("virtio-blk: dropping request chain: {why}");
        bump(&metrics.invalid_descriptors, 1);
        None
    };
    let (readable, writable) = match validate_request_chain(&chain, MAX_REQUEST_LEN) {
        Ok(lens) => lens,
        Err(e) => return invalid(&e.to_string()),
    };
    if readable < REQ_HDR_SIZE || writable == 0 {
        return invalid("no room for the header or the status byte");
    }
    let (Ok(mut reader), Ok(mut writer)) = (chain.clone().reader(mem), chain.writer(mem)) else {
        return invalid("cannot map the chain");
    };
    let mut hdr = [0u8; REQ_HDR_SIZE as usize];
    if reader.read_exact(&mut hdr).is_err() {
        return invalid("cannot read the header");
    }
    let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&hdr[8..16]);
    let sector = u64::from_le_bytes(sector);
    // The status byte is the last writable byte; everything writable before it is data.
    let data_len = writable - 1;
    let Ok(mut status_writer) = writer.split_at(data_len as usize) else {
        return invalid("cannot find the status byte");
    };

    let (status, written) = match kind {
        req_type::IN => {
            // Readable bytes past the header would be data the device cannot use.
            match disk_range(disk, sector, data_len).filter(|_| readable == REQ_HDR_SIZE) {
                Some(offset) => match copy_to_guest(disk, offset, data_len, &mut writer) {
                    Ok(()) => {
                        bump(&metrics.reads, 1);
                        bump(&metrics.read_bytes, data_len);
                        (status::OK, data_len)
                    }
                    Err(e) => {
                        tracing::warn!("virtio-blk: read at sector {sector} failed: {e}");
                        (status::IOERR, 0)
                    }
                },
                None => (status::IOERR, 0),
            }
        }
        req_type::OUT => {
            let len = readable - REQ_HDR_SIZE;
            match disk_range(disk, sector, len).filter(|_| !disk.read_only) {
                Some(offset) => match copy_from_guest(disk, offset, len, &mut reader) {
                    Ok(()) => {
                        bump(&metrics.writes, 1);
                        bump(&metrics.write_bytes, len);
                        (status::OK, 0)
                    }
                    Err(e) => {
                        tracing::warn!("virtio-blk: write at sector {sector} failed: {e}");
                        (status::IOERR, 0)
                    }
                },
                None => (status::IOERR, 0),
            }
        }
        req_type::FLUSH => match disk.file.sync_data() {
            Ok(()) => {
                bump(&metrics.flushes, 1);
                (status::OK, 0)
            }
            Err(e) => {
                tracing::warn!("virtio-blk: flush failed: {e}");
                (status::IOERR, 0)
            }
        },
        _ => {
            bump(&metrics.unsupported, 1);
            (status::UNSUPP, 0)
        }
    };
    if status == status::IOERR {
        bump(&metrics.io_errors, 1);
    }
    if status_writer.write_all(&[status]).is_err() {
        return invalid("cannot write the status byte");
    }
    // `written` is at most MAX_REQUEST_LEN, which fits a u32.
    Some((written + 1) as u32)
}

/// Reads `len` bytes of the file at `offset` into the guest's buffers.
fn copy_to_guest<W: Write>(
    disk: &Disk,
    mut offset: u64,
    len: u64,
    out: &mut W,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK.min(len as usize)];
    let mut left = len;
    while left > 0 {
        let n = (left as usize).min(buf.len());
        disk.file.read_exact_at(&mut buf[..n], offset)?;
        out.write_all(&buf[..n])?;
        offset += n as u64;
        left -= n as u64;
    }
    Ok(())
}

/// Writes `len` bytes from the guest's buffers to the file at `offset`.
fn copy_from_guest<R: Read>(
    disk: &Disk,
    mut offset: u64,
    len: u64,
    input: &mut R,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK.min(len as usize)];
    let mut left = len;
    while left > 0 {
        let n = (left as usize).min(buf.len());
        input.read_exact(&mut buf[..n])?;
        disk.file.write_all_at(&buf[..n], offset)?;
        offset += n as u64;
        left -= n as u64;
    }
    Ok(())
}
