//! Guest memory, backed by one sealed memfd so that vhost-user backends (virtiofsd) can map
//! the same pages later: each RAM region is a window of that file mapped `MAP_SHARED`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress, ReadVolatile, VolatileMemoryError, VolatileSlice,
};

use crate::arch::x86_64::layout::ram_regions;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// `memfd_create`, `ftruncate` or sealing failed.
    #[error("cannot create the guest memory file: {0}")]
    Memfd(#[source] std::io::Error),
    /// Mapping the regions failed.
    #[error("cannot map guest memory: {0}")]
    Map(#[from] vm_memory::mmap::FromRangesError),
}

/// Creates a memfd of `size` bytes that can neither grow nor shrink.
pub fn create_memfd(size: u64) -> Result<File, MemoryError> {
    let name = c"carapace-guest-ram";
    // SAFETY: `name` is a valid NUL-terminated string; the return value is checked.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(MemoryError::Memfd)?;
    let seals = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on a memfd we own, with valid seal flags; the result is checked.
    if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) } < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    Ok(file)
}

/// Guest RAM of `mem_size` bytes laid out by [`ram_regions`], all in one memfd.
pub fn create_guest_memory(mem_size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let file = create_memfd(mem_size)?;
    let mut offset = 0u64;
    let mut ranges = Vec::new();
    for (start, len) in ram_regions(mem_size) {
        let region_file = file.try_clone().map_err(MemoryError::Memfd)?;
        ranges.push((
            GuestAddress(start),
            len as usize,
            Some(FileOffset::new(region_file, offset)),
        ));
        offset += len;
    }
    Ok(GuestMemoryMmap::from_ranges_with_files(ranges)?)
}

/// The memfd and its offset behind guest memory at host address `host`, if the `len` bytes
/// there lie in one memfd-backed region.
fn memfd_at_host(mem: &GuestMemoryMmap, host: u64, len: usize) -> Option<(&File, u64)> {
    mem.iter().find_map(|region| {
        let base = region.get_host_address(MemoryRegionAddress(0)).ok()? as u64;
        let rel = host.checked_sub(base)?;
        let fo = region.file_offset()?;
        (rel.checked_add(len as u64)? <= region.len()).then(|| (fo.file(), fo.start() + rel))
    })
}

/// One `sendfile` of at most `len` bytes from `file` (at `in_offset`, or at its position,
/// which then advances) to `memfd` at `offset`; returns the bytes copied (0 at end of file).
///
/// Copying into the memfd instead of through the mapping is about 40% faster for the MiBs of
/// a kernel or initrd: the kernel fills fresh pages without zeroing them first, while a page
/// fault on the mapping zeroes each page before the copy overwrites it.
fn sendfile_into(
    memfd: &File,
    offset: u64,
    file: &File,
    in_offset: Option<&mut libc::off_t>,
    len: usize,
) -> std::io::Result<usize> {
    // sendfile writes at the output's file position; guest memory is only ever accessed
    // through mappings, so nothing else uses the memfd's position.
    (&*memfd).seek(SeekFrom::Start(offset))?;
    let in_offset = in_offset.map_or(std::ptr::null_mut(), |o| o as *mut libc::off_t);
    loop {
        // SAFETY: both fds are open for the duration of the call and `in_offset` is null or
        // a valid, exclusively borrowed offset; the result is checked.
        let n = unsafe {
            libc::sendfile(
                memfd.as_raw_fd(),
                file.as_raw_fd(),
                in_offset,
                len.min(0x7fff_f000),
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Copies `len` bytes from the start of `file` to guest address `addr`: through the memfd
/// when the range lies in one memfd-backed region (always, for our guest memory; see
/// [`sendfile_into`]), else through the mapping.
pub fn copy_file_to_guest(
    mem: &GuestMemoryMmap,
    file: &mut File,
    len: usize,
    addr: GuestAddress,
) -> std::io::Result<()> {
    let target = mem
        .get_host_address(addr)
        .ok()
        .and_then(|host| memfd_at_host(mem, host as u64, len));
    let Some((memfd, offset)) = target else {
        return mem
            .read_exact_volatile_from(addr, file, len)
            .map_err(std::io::Error::other);
    };
    let mut in_offset: libc::off_t = 0;
    let mut done = 0;
    while done < len {
        match sendfile_into(
            memfd,
            offset + done as u64,
            file,
            Some(&mut in_offset),
            len - done,
        )? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => done += n,
        }
    }
    Ok(())
}

/// A file reader for loaders that write guest memory through [`ReadVolatile`] (linux-loader's
/// ELF loader): reads into guest memory go through the memfd like [`copy_file_to_guest`];
/// everything else (headers into ordinary buffers, seeks) is the file's own.
pub struct GuestFileReader<'a> {
    file: File,
    mem: &'a GuestMemoryMmap,
}

impl<'a> GuestFileReader<'a> {
    /// Wraps `file`, a source for `mem`.
    pub fn new(file: File, mem: &'a GuestMemoryMmap) -> Self {
        Self { file, mem }
    }
}

impl Read for GuestFileReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }
}

impl Seek for GuestFileReader<'_> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        self.file.seek(pos)
    }
}

impl ReadVolatile for GuestFileReader<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let host = buf.ptr_guard_mut().as_ptr() as u64;
        let Some((memfd, offset)) = memfd_at_host(self.mem, host, buf.len()) else {
            return self.file.read_volatile(buf);
        };
        let n = sendfile_into(memfd, offset, &self.file, None, buf.len())
            .map_err(VolatileMemoryError::IOError)?;
        buf.bitmap().mark_dirty(0, n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn memory_is_one_shared_memfd() {
        let mem = create_guest_memory(64 << 20).unwrap();
        assert_eq!(mem.num_regions(), 1);
        let region = mem.iter().next().unwrap();
        let fo = region.file_offset().expect("file backed");
        assert_eq!(fo.start(), 0);
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        // The bytes are in the file, i.e. visible to another mapper of the memfd.
        let mut buf = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(fo.file(), &mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
        // Sealed: cannot be grown behind our back.
        assert!(fo.file().set_len(128 << 20).is_err());
    }

    #[test]
    fn files_are_copied_into_guest_memory_through_the_memfd() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let data: Vec<u8> = (0..3 * 4096 + 123).map(|i| (i * 7 % 251) as u8).collect();
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, &data).unwrap();
        // Unaligned, and again at another address: the memfd's position is set each time.
        for addr in [0x10_0123, 0x20_0000] {
            copy_file_to_guest(&mem, &mut file, data.len(), GuestAddress(addr)).unwrap();
            let mut back = vec![0u8; data.len()];
            mem.read_slice(&mut back, GuestAddress(addr)).unwrap();
            assert_eq!(back, data);
        }
        // The bytes around are untouched.
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10_0122)).unwrap(), 0);
        // A file shorter than asked for is an error, not a partial success.
        let err = copy_file_to_guest(&mem, &mut file, data.len() + 1, GuestAddress(0x30_0000))
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
        // Past the end of guest memory: refused by the fallback path.
        assert!(copy_file_to_guest(&mem, &mut file, data.len(), GuestAddress(64 << 20)).is_err());
    }

    #[test]
    fn guest_file_reader_fills_guest_memory_through_the_memfd() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let data: Vec<u8> = (0..2 * 4096 + 77).map(|i| (i * 13 % 253) as u8).collect();
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, &data).unwrap();
        let mut reader = GuestFileReader::new(file, &mem);
        // Ordinary reads and seeks are the file's (an ELF loader reads its headers so).
        reader.seek(SeekFrom::Start(5)).unwrap();
        let mut head = [0u8; 4];
        reader.read_exact(&mut head).unwrap();
        assert_eq!(head, data[5..9]);
        // A segment: from the current position into guest memory, position advanced.
        reader.seek(SeekFrom::Start(100)).unwrap();
        mem.read_exact_volatile_from(GuestAddress(0x10_0000), &mut reader, data.len() - 100)
            .unwrap();
        let mut back = vec![0u8; data.len() - 100];
        mem.read_slice(&mut back, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(back, data[100..]);
        assert_eq!(reader.stream_position().unwrap(), data.len() as u64);
        // Past the end of the file: a short read, reported as an error.
        reader.seek(SeekFrom::Start(10)).unwrap();
        assert!(mem
            .read_exact_volatile_from(GuestAddress(0x20_0000), &mut reader, data.len())
            .is_err());
    }

    #[test]
    fn large_memory_skips_the_gap() {
        // Only the mapping is created (MAP_NORESERVE); nothing is touched.
        let mem = create_guest_memory(4 << 30).unwrap();
        assert_eq!(mem.num_regions(), 2);
        let high = mem.iter().nth(1).unwrap();
        assert_eq!(high.start_addr(), GuestAddress(1 << 32));
        assert_eq!(high.file_offset().unwrap().start(), 0xd000_0000);
    }
}
