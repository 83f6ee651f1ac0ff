//! Guest memory, in one of two backings:
//!
//! - **shared**, when a vhost-user backend (virtiofsd) must map the same pages: one sealed
//!   memfd, each RAM region a window of it mapped `MAP_SHARED`;
//! - **private** otherwise (every device in this process): anonymous memory, each region
//!   placed at a 2 MiB-aligned host address so that KVM can map a transparent huge page of
//!   the host with one 2 MiB entry of the guest's nested page tables, where a 4 KiB page needs
//!   one nested page fault (a VM exit) per page. See docs/vmm.md, "Guest memory".
//!
//! Both are advised `MADV_HUGEPAGE`; for the memfd that takes effect only where the host
//! allows huge pages in shared memory (`/sys/kernel/mm/transparent_hugepage/shmem_enabled`
//! at `advise` or more; Debian's default is `never`).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::mmap::MmapRegion;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MemoryRegionAddress, ReadVolatile, VolatileMemoryError, VolatileSlice,
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
    /// Mapping private guest memory failed.
    #[error("cannot map guest memory: {0}")]
    MapPrivate(#[source] std::io::Error),
}

/// What backs guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// One sealed memfd, mapped shared: a vhost-user backend can map it too.
    Shared,
    /// Private anonymous memory at 2 MiB-aligned host addresses.
    Private,
}

/// A transparent huge page of x86-64, and the alignment private regions get.
const HUGE_PAGE: usize = 2 << 20;

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

/// Guest RAM of `mem_size` bytes laid out by [`ram_regions`], backed as `backing` says, and
/// advised `MADV_HUGEPAGE`.
pub fn create_guest_memory(
    mem_size: u64,
    backing: Backing,
) -> Result<GuestMemoryMmap, MemoryError> {
    let mem = match backing {
        Backing::Shared => shared_memory(mem_size)?,
        Backing::Private => private_memory(mem_size)?,
    };
    for region in mem.iter() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .expect("a region's first byte is in it");
        // SAFETY: advice on a range this process mapped; it changes no content. Failure
        // (a kernel without transparent huge pages) leaves ordinary pages, which is fine.
        unsafe {
            libc::madvise(host.cast(), region.len() as usize, libc::MADV_HUGEPAGE);
        }
    }
    Ok(mem)
}

/// Private anonymous regions, each at a host address that is a multiple of [`HUGE_PAGE`] (as
/// every region's guest address is): KVM maps a huge page with one nested entry only where
/// host and guest addresses agree modulo its size, and the kernel here does not align
/// anonymous mappings by itself.
///
/// The mappings stay for the life of the process (vm-memory only unmaps mappings it made
/// itself): a VMM process runs one VM, whose memory goes when the process exits.
fn private_memory(mem_size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let mut regions = Vec::new();
    for (start, len) in ram_regions(mem_size) {
        let len = usize::try_from(len)
            .map_err(|_| MemoryError::MapPrivate(std::io::ErrorKind::InvalidInput.into()))?;
        let host = map_aligned(len).map_err(MemoryError::MapPrivate)?;
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        // SAFETY: `host..host + len` was just mapped with these protections and flags and is
        // never unmapped.
        let mapping = unsafe { MmapRegion::build_raw(host, len, prot, flags) }
            .map_err(|e| MemoryError::MapPrivate(std::io::Error::other(e)))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start)).ok_or_else(|| {
            MemoryError::MapPrivate(std::io::Error::other("region wraps the address space"))
        })?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions)
        .map_err(|e| MemoryError::MapPrivate(std::io::Error::other(e)))
}

/// Maps `len` bytes of private anonymous memory at a multiple of [`HUGE_PAGE`]: reserves
/// `len + HUGE_PAGE` bytes of address space, maps the memory over its aligned part, and
/// returns the rest of the reservation.
fn map_aligned(len: usize) -> std::io::Result<*mut u8> {
    let reserve = len
        .checked_add(HUGE_PAGE)
        .ok_or(std::io::ErrorKind::InvalidInput)?;
    let noreserve = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    // SAFETY: a new mapping at an address of the kernel's choice; the result is checked.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            reserve,
            libc::PROT_NONE,
            noreserve,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let base = base as usize;
    let start = base.next_multiple_of(HUGE_PAGE);
    // SAFETY: `start..start + len` lies inside the reservation just made, which nothing else
    // uses: MAP_FIXED replaces only that.
    let mapped = unsafe {
        libc::mmap(
            start as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            noreserve | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    let unmap = |from: usize, to: usize| {
        if to > from {
            // SAFETY: unmaps part of our own reservation, which holds nothing else.
            unsafe { libc::munmap(from as *mut libc::c_void, to - from) };
        }
    };
    if mapped == libc::MAP_FAILED {
        let e = std::io::Error::last_os_error();
        unmap(base, base + reserve);
        return Err(e);
    }
    // The reservation's unused head and tail.
    unmap(base, start);
    unmap(start + len, base + reserve);
    Ok(start as *mut u8)
}

/// Guest RAM of `mem_size` bytes laid out by [`ram_regions`], all in one memfd.
fn shared_memory(mem_size: u64) -> Result<GuestMemoryMmap, MemoryError> {
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

/// The page size of guest RAM's host mappings that [`discard`] works in.
pub const DISCARD_PAGE: u64 = 4096;

/// Why a range of guest memory was not discarded.
#[derive(Debug, thiserror::Error)]
pub enum DiscardError {
    /// The range is not inside one RAM region (or its end overflows).
    #[error("range {addr:#x}+{len:#x} is not inside one guest RAM region")]
    OutOfRange {
        /// Guest physical start.
        addr: u64,
        /// Length in bytes.
        len: u64,
    },
    /// `madvise` or `fallocate` failed.
    #[error("cannot discard guest memory: {0}")]
    Host(#[source] std::io::Error),
}

/// Gives the host memory behind the guest RAM range `addr`..`addr + len` back to the host:
/// the guest reads zeros there afterwards. Only whole pages inside the range are discarded
/// (a partial page at either end is kept). Private RAM is dropped with `MADV_DONTNEED`; for
/// RAM in the memfd a hole is punched in the file, which also frees it in every other
/// mapping of it (a vhost-user backend's). Returns the bytes discarded.
///
/// The range comes from the guest: it is checked to lie in one region before anything is
/// touched.
pub fn discard(mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) -> Result<u64, DiscardError> {
    let out_of_range = || DiscardError::OutOfRange { addr: addr.0, len };
    let end = addr.0.checked_add(len).ok_or_else(out_of_range)?;
    let region = mem.find_region(addr).ok_or_else(out_of_range)?;
    let offset = addr.0 - region.start_addr().0;
    if end - region.start_addr().0 > region.len() {
        return Err(out_of_range());
    }
    let first = offset.div_ceil(DISCARD_PAGE) * DISCARD_PAGE;
    let last = (end - region.start_addr().0) / DISCARD_PAGE * DISCARD_PAGE;
    if last <= first {
        return Ok(0);
    }
    let bytes = last - first;
    let host = region
        .get_host_address(MemoryRegionAddress(first))
        .map_err(|_| out_of_range())?;
    let result = match region.file_offset() {
        // SAFETY: punching a hole in our own memfd, inside the window this region maps
        // (checked above); KEEP_SIZE leaves the sealed size alone.
        Some(fo) => unsafe {
            libc::fallocate(
                fo.file().as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                (fo.start() + first) as libc::off_t,
                bytes as libc::off_t,
            )
        },
        // SAFETY: `host`..`host + bytes` lies inside this region's private anonymous
        // mapping (checked above), which only guest memory accesses use; after
        // MADV_DONTNEED they read zeros, which is what the guest asked for.
        None => unsafe { libc::madvise(host.cast(), bytes as usize, libc::MADV_DONTNEED) },
    };
    if result != 0 {
        return Err(DiscardError::Host(std::io::Error::last_os_error()));
    }
    Ok(bytes)
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
        file.seek(SeekFrom::Start(0))?;
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
        let mem = create_guest_memory(64 << 20, Backing::Shared).unwrap();
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
    fn private_memory_is_anonymous_and_huge_page_aligned() {
        // Above 3 GiB of RAM the layout has two regions (below and above the MMIO gap).
        let mem = create_guest_memory(4 << 30, Backing::Private).unwrap();
        assert_eq!(mem.num_regions(), 2);
        for region in mem.iter() {
            assert!(region.file_offset().is_none(), "not file backed");
            let host = region.get_host_address(MemoryRegionAddress(0)).unwrap() as usize;
            assert_eq!(host % HUGE_PAGE, 0, "host address {host:#x}");
            assert_eq!(region.start_addr().0 % HUGE_PAGE as u64, 0);
        }
        // Usable at both ends of each region; files are copied through the mapping.
        let high = mem.last_addr();
        mem.write_obj(0x1122_3344_u32, GuestAddress(0)).unwrap();
        mem.write_obj(0x55_u8, high).unwrap();
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0)).unwrap(), 0x1122_3344);
        assert_eq!(mem.read_obj::<u8>(high).unwrap(), 0x55);
        let data: Vec<u8> = (0..5000).map(|i| (i % 241) as u8).collect();
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, &data).unwrap();
        copy_file_to_guest(&mem, &mut file, data.len(), GuestAddress(0x10_0001)).unwrap();
        let mut back = vec![0u8; data.len()];
        mem.read_slice(&mut back, GuestAddress(0x10_0001)).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn files_are_copied_into_guest_memory_through_the_memfd() {
        let mem = create_guest_memory(64 << 20, Backing::Shared).unwrap();
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
        let mem = create_guest_memory(64 << 20, Backing::Shared).unwrap();
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

    /// Resident bytes of the mapping at `host` (`mincore`, whole pages).
    fn resident(host: *mut u8, len: usize) -> usize {
        let mut vec = vec![0u8; len / 4096];
        // SAFETY: `host`..`host + len` is a mapping of ours; `vec` has a byte per page.
        let r = unsafe { libc::mincore(host.cast(), len, vec.as_mut_ptr()) };
        assert_eq!(r, 0);
        vec.iter().filter(|b| *b & 1 == 1).count() * 4096
    }

    #[test]
    fn discard_gives_pages_back_and_they_read_as_zero() {
        for backing in [Backing::Private, Backing::Shared] {
            let mem = create_guest_memory(64 << 20, backing).unwrap();
            let base = 0x40_0000u64;
            let fill = vec![0xa5u8; 4 << 20];
            mem.write_slice(&fill, GuestAddress(base)).unwrap();
            let region = mem.find_region(GuestAddress(base)).unwrap();
            let host = region.get_host_address(MemoryRegionAddress(base)).unwrap();
            assert_eq!(resident(host, 4 << 20), 4 << 20, "{backing:?}");
            // Unaligned at both ends: the partial pages stay. The range is base + 100 to
            // base + 2 MiB + 4100, so the whole pages are base + 4 KiB to base + 2 MiB + 4 KiB.
            let n = discard(&mem, GuestAddress(base + 100), (2 << 20) + 4000).unwrap();
            assert_eq!(n, 2 << 20, "{backing:?}");
            assert_eq!(mem.read_obj::<u8>(GuestAddress(base + 4095)).unwrap(), 0xa5);
            let mut back = vec![1u8; 2 << 20];
            mem.read_slice(&mut back, GuestAddress(base + 4096))
                .unwrap();
            assert!(back.iter().all(|b| *b == 0), "{backing:?}");
            assert_eq!(
                mem.read_obj::<u8>(GuestAddress(base + (2 << 20) + 4096))
                    .unwrap(),
                0xa5
            );
            // Whole 2 MiB pages: nothing of them stays resident (reading them above faulted
            // the first one back in, as zeros; discard it again).
            discard(&mem, GuestAddress(base), 4 << 20).unwrap();
            assert_eq!(resident(host, 4 << 20), 0, "{backing:?}");
            if let Some(fo) = region.file_offset() {
                // The memfd itself lost the pages: another mapper sees zeros too.
                let mut b = [0xffu8; 1];
                std::os::unix::fs::FileExt::read_exact_at(fo.file(), &mut b, base + 8192).unwrap();
                assert_eq!(b[0], 0);
                assert_eq!(fo.file().metadata().unwrap().len(), 64 << 20, "size kept");
            }
            // Less than a page, or nothing: nothing happens.
            assert_eq!(discard(&mem, GuestAddress(base + 1), 4095).unwrap(), 0);
            assert_eq!(discard(&mem, GuestAddress(base), 0).unwrap(), 0);
        }
    }

    #[test]
    fn discard_refuses_ranges_outside_one_region() {
        let mem = create_guest_memory(4 << 30, Backing::Private).unwrap();
        let low_end = mem.iter().next().unwrap().len();
        for (addr, len) in [
            (64u64 << 30, 4096u64),  // past all RAM
            (low_end - 4096, 8192),  // into the MMIO gap
            (0xd000_0000, 4096),     // in the gap
            (u64::MAX - 4095, 8192), // end overflows
            (4096, u64::MAX),        // length overflows
        ] {
            assert!(
                matches!(
                    discard(&mem, GuestAddress(addr), len),
                    Err(DiscardError::OutOfRange { .. })
                ),
                "{addr:#x}+{len:#x}"
            );
        }
        // The last page below the gap is fine.
        mem.write_obj(7u8, GuestAddress(low_end - 1)).unwrap();
        assert_eq!(
            discard(&mem, GuestAddress(low_end - 4096), 4096).unwrap(),
            4096
        );
        assert_eq!(mem.read_obj::<u8>(GuestAddress(low_end - 1)).unwrap(), 0);
    }

    #[test]
    fn large_memory_skips_the_gap() {
        // Only the mapping is created (MAP_NORESERVE); nothing is touched.
        let mem = create_guest_memory(4 << 30, Backing::Shared).unwrap();
        assert_eq!(mem.num_regions(), 2);
        let high = mem.iter().nth(1).unwrap();
        assert_eq!(high.start_addr(), GuestAddress(1 << 32));
        assert_eq!(high.file_offset().unwrap().start(), 0xd000_0000);
    }
}
