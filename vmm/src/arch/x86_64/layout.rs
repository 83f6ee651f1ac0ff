//! Guest physical memory layout (the same places Firecracker uses, so a reader can compare).
//!
//! ```text
//! 0x0000_0500  GDT                         0x0000_7000  zero page (boot_params)
//! 0x0000_0520  IDT (empty)                 0x0000_8ff0  boot stack top
//! 0x0000_9000  PML4, 0xa000 PDPT, 0xb000..0xf000 four page directories (4 GiB identity map)
//! 0x0002_0000  kernel command line         0x0009_fc00  EBDA (end of low RAM)
//! 0x0010_0000  high memory: the kernel (vmlinux loads at its own physical address)
//! ...          initrd, at the top of RAM below the MMIO gap
//! 0xd000_0000  MMIO gap: virtio-mmio devices, one 4 KiB slot each (768 MiB up to 4 GiB,
//!              which also holds the IOAPIC at 0xfec0_0000 and the LAPIC at 0xfee0_0000)
//! 0x1_0000_0000 RAM above 4 GiB, if the guest has more than 3.25 GiB
//! ```

/// Global descriptor table.
pub const BOOT_GDT_START: u64 = 0x500;
/// Interrupt descriptor table (left empty: the kernel installs its own).
pub const BOOT_IDT_START: u64 = 0x520;
/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page map level 4.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// First of four page directories (2 MiB pages).
pub const PDE_START: u64 = 0xb000;
/// How many GiB the boot page tables identity-map.
pub const IDENTITY_MAPPED_GIB: u64 = 4;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Command line buffer size including the NUL (x86 `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area: low RAM ends here in the e820 map.
pub const EBDA_START: u64 = 0x9fc00;
/// The MP table (floating pointer first): the first KiB of the EBDA, where Linux looks.
pub const MPTABLE_START: u64 = EBDA_START;
/// The IOAPIC's register window.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// The local APICs' register window.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// Start of high memory, where the kernel lives.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap.
pub const MMIO_MEM_START: u64 = 0xd000_0000;
/// First address above 32 bits.
pub const FIRST_ADDR_PAST_32BITS: u64 = 1 << 32;
/// Size of each virtio-mmio device's register window.
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
/// How many MMIO device slots we hand out (keeps clear of the IOAPIC).
pub const MMIO_MAX_DEVICES: u64 = 64;
/// First GSI for virtio devices (0-4 are legacy: PIT, keyboard, cascade, COM2, COM1).
pub const IRQ_BASE: u32 = 5;
/// Last GSI routed to the IOAPIC.
pub const IRQ_MAX: u32 = 23;
/// COM1 interrupt.
pub const SERIAL_IRQ: u32 = 4;
/// COM1 I/O port base.
pub const SERIAL_PORT: u16 = 0x3f8;
/// i8042 controller I/O ports (0x60..=0x64).
pub const I8042_PORT: u16 = 0x60;
/// KVM's TSS needs three pages below 4 GiB outside guest RAM.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;

/// The guest RAM regions for `mem_size` bytes: below the MMIO gap, then above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_MEM_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_MEM_START),
            (FIRST_ADDR_PAST_32BITS, mem_size - MMIO_MEM_START),
        ]
    }
}

/// Base address of MMIO device slot `index`.
pub fn mmio_slot(index: u64) -> u64 {
    MMIO_MEM_START + index * MMIO_DEVICE_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_skip_the_mmio_gap() {
        assert_eq!(ram_regions(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(ram_regions(MMIO_MEM_START), vec![(0, MMIO_MEM_START)]);
        assert_eq!(
            ram_regions(4 << 30),
            vec![(0, MMIO_MEM_START), (1 << 32, (4 << 30) - MMIO_MEM_START)]
        );
    }

    #[test]
    fn mmio_slots_stay_below_the_ioapic() {
        assert!(mmio_slot(MMIO_MAX_DEVICES) <= 0xfec0_0000);
        assert!(u64::from(IRQ_BASE) + MMIO_MAX_DEVICES > u64::from(IRQ_MAX));
    }
}
