//! The boot GDT and identity-mapped page tables that put the vCPU straight into long mode.

use kvm_bindings::kvm_segment;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, IDENTITY_MAPPED_GIB, PDE_START, PDPTE_START, PML4_START,
};

/// Errors writing the boot tables.
#[derive(Debug, thiserror::Error)]
pub enum GdtError {
    /// Guest memory does not cover a boot table.
    #[error("cannot write {0} to guest memory")]
    Write(&'static str),
}

/// Selector of the 64-bit code segment (`__BOOT_CS` in the Linux boot protocol).
pub const BOOT_CS_SELECTOR: u16 = 0x10;
/// Selector of the data segment (`__BOOT_DS`).
pub const BOOT_DS_SELECTOR: u16 = 0x18;
/// Selector of the TSS.
pub const BOOT_TSS_SELECTOR: u16 = 0x20;

/// The boot GDT: two null entries so that code and data land on the selectors the Linux
/// 64-bit boot protocol names, then code, data and a TSS.
pub const BOOT_GDT: [u64; 5] = [
    0,
    0,
    gdt_entry(0xa09b, 0, 0xfffff), // code: present, DPL 0, exec/read, long mode, 4 KiB gran.
    gdt_entry(0xc093, 0, 0xfffff), // data: present, DPL 0, read/write, 32-bit, 4 KiB gran.
    gdt_entry(0x808b, 0, 0xfffff), // TSS: present, busy 64-bit TSS.
];

/// Packs flags, base and limit into a segment descriptor.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Unpacks a GDT entry into the segment register form KVM wants.
pub fn kvm_segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let mut limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    if g == 1 {
        limit = (limit << 12) | 0xfff;
    }
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Writes the GDT and an empty IDT.
pub fn write_gdt_and_idt(mem: &GuestMemoryMmap) -> Result<(), GdtError> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(|_| GdtError::Write("GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|_| GdtError::Write("IDT"))
}

/// Writes page tables identity-mapping the first [`IDENTITY_MAPPED_GIB`] GiB with 2 MiB pages;
/// returns the value for CR3.
pub fn write_page_tables(mem: &GuestMemoryMmap) -> Result<u64, GdtError> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    mem.write_obj(PDPTE_START | PRESENT_RW, GuestAddress(PML4_START))
        .map_err(|_| GdtError::Write("PML4"))?;
    for gib in 0..IDENTITY_MAPPED_GIB {
        let pd = PDE_START + gib * 0x1000;
        mem.write_obj(pd | PRESENT_RW, GuestAddress(PDPTE_START + gib * 8))
            .map_err(|_| GdtError::Write("PDPT"))?;
        for i in 0..512u64 {
            let phys = (gib << 30) | (i << 21);
            mem.write_obj(phys | PRESENT_RW | PAGE_SIZE_2M, GuestAddress(pd + i * 8))
                .map_err(|_| GdtError::Write("page directory"))?;
        }
    }
    Ok(PML4_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_decodes_to_long_mode() {
        let cs = kvm_segment_from_gdt(BOOT_GDT[2], BOOT_CS_SELECTOR);
        assert_eq!((cs.l, cs.db, cs.present, cs.s, cs.type_), (1, 0, 1, 1, 0xb));
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = kvm_segment_from_gdt(BOOT_GDT[3], BOOT_DS_SELECTOR);
        assert_eq!((ds.l, ds.db, ds.type_), (0, 1, 3));
        let null = kvm_segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn page_tables_map_4_gib_identity() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert_eq!(write_page_tables(&mem).unwrap(), PML4_START);
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        let pdpt3: u64 = mem.read_obj(GuestAddress(PDPTE_START + 24)).unwrap();
        assert_eq!(pdpt3, (PDE_START + 0x3000) | 3);
        // The last 2 MiB page of the 4th GiB maps to itself.
        let last: u64 = mem
            .read_obj(GuestAddress(PDE_START + 0x3000 + 511 * 8))
            .unwrap();
        assert_eq!(last, (3u64 << 30 | 511 << 21) | 0x83);
    }
}
