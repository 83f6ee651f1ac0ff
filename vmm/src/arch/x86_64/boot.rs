//! Direct kernel boot (Linux x86 64-bit boot protocol): the `vmlinux` ELF at its physical
//! address, the initrd at the top of low RAM, the command line, and the zero page with an
//! e820 map. See `Documentation/arch/x86/boot.rst` in the kernel tree.

use std::fs::File;
use std::path::Path;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::{load_cmdline, Cmdline, Elf, KernelLoader};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::vstate::memory::{copy_file_to_guest, GuestFileReader};

use super::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, MMIO_MEM_START, ZERO_PAGE_START,
};

/// Errors loading the guest's boot images.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened.
    #[error("cannot open kernel {path}")]
    OpenKernel {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is not a loadable x86_64 ELF (or does not fit in guest memory).
    #[error("cannot load kernel: {0}")]
    LoadKernel(#[from] linux_loader::loader::Error),
    /// The initrd cannot be read.
    #[error("cannot read initrd {path}")]
    ReadInitrd {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The initrd does not fit between the kernel and the end of low RAM.
    #[error("initrd of {size} bytes does not fit in guest memory")]
    InitrdTooBig {
        /// Its size.
        size: u64,
    },
    /// The initrd could not be copied into guest memory.
    #[error("cannot copy initrd into guest memory")]
    WriteInitrd,
    /// The command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(#[from] linux_loader::cmdline::Error),
    /// Writing the zero page failed.
    #[error("cannot write boot parameters: {0}")]
    BootParams(#[from] linux_loader::configurator::Error),
}

/// Where the kernel ended up.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// 64-bit entry point (physical; the identity map makes it the virtual one too).
    pub entry: GuestAddress,
    /// First byte past the kernel image.
    pub end: u64,
}

/// Loads the `vmlinux` ELF at its physical load address.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let file = File::open(path).map_err(|source| BootError::OpenKernel {
        path: path.display().to_string(),
        source,
    })?;
    let mut reader = GuestFileReader::new(file, mem);
    let result = Elf::load(mem, None, &mut reader, Some(GuestAddress(HIMEM_START)))?;
    Ok(LoadedKernel {
        entry: result.kernel_load,
        end: result.kernel_end,
    })
}

/// An initrd in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct InitrdRegion {
    /// Start address (page aligned).
    pub addr: GuestAddress,
    /// Size in bytes.
    pub size: u64,
}

/// Highest address + 1 of guest RAM below the MMIO gap.
fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    mem.iter()
        .map(|r| r.last_addr().raw_value() + 1)
        .filter(|end| *end <= MMIO_MEM_START)
        .max()
        .unwrap_or(0)
}

/// Copies the initrd to the highest page-aligned spot of low RAM, above the kernel.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
) -> Result<InitrdRegion, BootError> {
    let read_err = |source| BootError::ReadInitrd {
        path: path.display().to_string(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let top = low_ram_end(mem);
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end.max(HIMEM_START))
        .ok_or(BootError::InitrdTooBig { size })?;
    let len = usize::try_from(size).map_err(|_| BootError::InitrdTooBig { size })?;
    copy_file_to_guest(mem, &mut file, len, GuestAddress(addr))
        .map_err(|_| BootError::WriteInitrd)?;
    Ok(InitrdRegion {
        addr: GuestAddress(addr),
        size,
    })
}

/// e820 types.
const E820_RAM: u32 = 1;

/// The e820 map for this guest memory: low RAM up to the EBDA, then every region from 1 MiB.
pub fn e820_map(mem: &GuestMemoryMmap) -> Vec<(u64, u64, u32)> {
    let mut map = vec![(0, EBDA_START, E820_RAM)];
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIMEM_START);
        let end = region.last_addr().raw_value() + 1;
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

/// Writes the command line and the zero page (boot_params with e820 map, cmdline pointer,
/// initrd location).
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    cmdline: &Cmdline,
    initrd: Option<InitrdRegion>,
) -> Result<(), BootError> {
    const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
    const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
    const KERNEL_LOADER_OTHER: u8 = 0xff;
    const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;

    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline)?;
    let cmdline_len = cmdline.as_cstring()?.as_bytes().len();

    let mut params = boot_params::default();
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr.raw_value() as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    let map = e820_map(mem);
    for (i, (addr, size, type_)) in map.iter().enumerate().take(params.e820_table.len()) {
        params.e820_table[i].addr = *addr;
        params.e820_table[i].size = *size;
        params.e820_table[i].r#type = *type_;
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;

    let bp = BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&bp, mem)?;
    Ok(())
}

/// Builds the command line object from the user's text plus VMM-added entries.
pub fn build_cmdline(user: &str, extra: &[String]) -> Result<Cmdline, BootError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE)?;
    if !user.trim().is_empty() {
        cmdline.insert_str(user.trim())?;
    }
    for e in extra {
        cmdline.insert_str(e)?;
    }
    Ok(cmdline)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn mem(size: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    #[test]
    fn e820_covers_low_and_high_ram() {
        let m = mem(64 << 20);
        assert_eq!(
            e820_map(&m),
            vec![
                (0, EBDA_START, 1),
                (HIMEM_START, (64 << 20) - HIMEM_START, 1)
            ]
        );
    }

    #[test]
    fn zero_page_holds_cmdline_and_initrd() {
        let m = mem(64 << 20);
        let cmdline = build_cmdline("console=ttyS0", &["foo=bar".into()]).unwrap();
        let initrd = InitrdRegion {
            addr: GuestAddress(0x300_0000),
            size: 1234,
        };
        write_boot_params(&m, &cmdline, Some(initrd)).unwrap();
        let bp: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ bp.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ bp.hdr.ramdisk_image }, 0x300_0000);
        assert_eq!({ bp.hdr.ramdisk_size }, 1234);
        assert_eq!(bp.e820_entries, 2);
        let mut text = [0u8; 22];
        m.read_slice(&mut text, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&text, b"console=ttyS0 foo=bar\0");
    }

    #[test]
    fn initrd_goes_to_top_of_low_ram() {
        let m = mem(32 << 20);
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, &[7u8; 5000]).unwrap();
        let r = load_initrd(&m, f.path(), 0x20_0000).unwrap();
        assert_eq!(r.addr.raw_value(), ((32 << 20) - 5000) & !0xfff);
        let mut b = [0u8; 1];
        m.read_slice(&mut b, r.addr.unchecked_add(4999)).unwrap();
        assert_eq!(b[0], 7);
        // Too big to fit above the kernel.
        let err = load_initrd(&m, f.path(), (32 << 20) - 4096).unwrap_err();
        assert!(matches!(err, BootError::InitrdTooBig { .. }));
    }
}
