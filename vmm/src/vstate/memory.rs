//! Guest memory, backed by one sealed memfd so that vhost-user backends (virtiofsd) can map
//! the same pages later: each RAM region is a window of that file mapped `MAP_SHARED`.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

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
    fn large_memory_skips_the_gap() {
        // Only the mapping is created (MAP_NORESERVE); nothing is touched.
        let mem = create_guest_memory(4 << 30).unwrap();
        assert_eq!(mem.num_regions(), 2);
        let high = mem.iter().nth(1).unwrap();
        assert_eq!(high.start_addr(), GuestAddress(1 << 32));
        assert_eq!(high.file_offset().unwrap().start(), 0xd000_0000);
    }
}
