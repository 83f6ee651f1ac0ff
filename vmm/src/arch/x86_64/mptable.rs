//! The Intel MultiProcessor Specification 1.4 table: how a Linux guest without ACPI finds its
//! CPUs (one processor entry per vCPU), the IOAPIC and the routing of the 24 interrupt pins.
//! Linux scans the first KiB of the EBDA for the floating pointer, so it goes at
//! [`MPTABLE_START`] (the same place Firecracker puts it).
//!
//! The table is built as plain little-endian bytes (the layout is fixed by the spec and has
//! no padding), then copied into guest memory.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{IOAPIC_ADDR, IRQ_MAX, LAPIC_ADDR, MPTABLE_START};

/// Errors writing the MP table.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MptableError {
    /// More vCPUs than APIC ids below the IOAPIC's id.
    #[error("too many vCPUs for the MP table: {0}")]
    TooManyCpus(u8),
    /// The table does not fit in guest memory at [`MPTABLE_START`].
    #[error("cannot write the MP table to guest memory")]
    Write,
}

/// Longest table we write: it must stay inside the 1 KiB EBDA window Linux scans.
const MAX_TABLE_SIZE: usize = 1024;

const MPC_SIGNATURE: &[u8; 4] = b"PCMP";
const MPF_SIGNATURE: &[u8; 4] = b"_MP_";
const MP_SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
/// Family 6 in the CPU signature; Linux only prints it.
const CPU_SIGNATURE: u32 = 0x600;
/// CPUID.1:EDX bits FPU and APIC.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;
const BUS_ID_ISA: u8 = 0;
const MPC_HEADER_SIZE: usize = 44;
const MPF_SIZE: usize = 16;

/// Two's-complement checksum: the byte that makes the slice sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// The whole table for `cpus` vCPUs (floating pointer first, then the configuration table),
/// to be placed at [`MPTABLE_START`].
pub fn build(cpus: u8) -> Result<Vec<u8>, MptableError> {
    // APIC ids are 0..cpus; the IOAPIC takes the next one.
    if cpus == 0 || u32::from(cpus) >= 0xff {
        return Err(MptableError::TooManyCpus(cpus));
    }
    let ioapic_id = cpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[MP_PROCESSOR, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[MP_BUS, BUS_ID_ISA]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[MP_IOAPIC, ioapic_id, IOAPIC_VERSION, CPU_ENABLED]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    count += 1;
    for pin in 0..=(IRQ_MAX as u8) {
        // Polarity and trigger "conform to the bus": edge, active high on ISA.
        entries.extend_from_slice(&[MP_INTSRC, MP_IRQ_INT, 0, 0, BUS_ID_ISA, pin, ioapic_id, pin]);
        count += 1;
    }
    // LINT0 of every LAPIC is the PIC's ExtINT, LINT1 is NMI (destination 0xff = all).
    entries.extend_from_slice(&[MP_LINTSRC, MP_IRQ_EXTINT, 0, 0, BUS_ID_ISA, 0, 0xff, 0]);
    entries.extend_from_slice(&[MP_LINTSRC, MP_IRQ_NMI, 0, 0, BUS_ID_ISA, 0, 0xff, 1]);
    count += 2;

    let table_len = MPC_HEADER_SIZE + entries.len();
    if MPF_SIZE + table_len > MAX_TABLE_SIZE {
        return Err(MptableError::TooManyCpus(cpus));
    }
    let table_addr = MPTABLE_START + MPF_SIZE as u64;

    let mut mpf = Vec::with_capacity(MPF_SIZE);
    mpf.extend_from_slice(MPF_SIGNATURE);
    mpf.extend_from_slice(&(table_addr as u32).to_le_bytes());
    // Length in 16-byte units, spec revision, checksum (patched below), 5 feature bytes
    // (all zero: a configuration table is present, no default configuration).
    mpf.extend_from_slice(&[1, MP_SPEC_REV, 0, 0, 0, 0, 0, 0]);
    mpf[10] = checksum(&mpf);

    let mut mpc = Vec::with_capacity(table_len);
    mpc.extend_from_slice(MPC_SIGNATURE);
    mpc.extend_from_slice(&(table_len as u16).to_le_bytes());
    mpc.extend_from_slice(&[MP_SPEC_REV, 0]); // revision, checksum (patched below)
    mpc.extend_from_slice(b"CARAPACE");
    mpc.extend_from_slice(b"microVM     ");
    mpc.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    mpc.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    mpc.extend_from_slice(&count.to_le_bytes());
    mpc.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    mpc.extend_from_slice(&[0; 4]); // extended table length and checksum, reserved
    debug_assert_eq!(mpc.len(), MPC_HEADER_SIZE);
    mpc.extend_from_slice(&entries);
    mpc[7] = checksum(&mpc);

    mpf.extend_from_slice(&mpc);
    Ok(mpf)
}

/// Writes the MP table for `cpus` vCPUs into guest memory.
pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MptableError> {
    let table = build(cpus)?;
    mem.write_slice(&table, GuestAddress(MPTABLE_START))
        .map_err(|_| MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn checksums_and_counts_are_right() {
        let t = build(3).unwrap();
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(sum(&t[..16]), 0);
        let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
        assert_eq!(ptr, MPTABLE_START + 16);
        let mpc = &t[16..];
        assert_eq!(&mpc[..4], b"PCMP");
        let len = u16::from_le_bytes([mpc[4], mpc[5]]) as usize;
        assert_eq!(len, mpc.len());
        assert_eq!(sum(mpc), 0);
        let count = u16::from_le_bytes([mpc[34], mpc[35]]);
        // 3 CPUs + bus + IOAPIC + 24 pins + 2 local interrupts.
        assert_eq!(count, 3 + 1 + 1 + 24 + 2);
        // Processor entries: APIC ids 0..3, only the first is the BSP.
        for id in 0..3usize {
            let e = &mpc[44 + 20 * id..];
            assert_eq!((e[0], e[1]), (MP_PROCESSOR, id as u8));
            assert_eq!(e[3] & CPU_BOOTPROCESSOR != 0, id == 0);
        }
        // The IOAPIC comes after the bus and has the next APIC id.
        let io = &mpc[44 + 60 + 8..];
        assert_eq!((io[0], io[1]), (MP_IOAPIC, 3));
        assert_eq!(
            u32::from_le_bytes(io[4..8].try_into().unwrap()),
            0xfec0_0000
        );
    }

    #[test]
    fn limits_are_enforced() {
        assert_eq!(build(0), Err(MptableError::TooManyCpus(0)));
        assert!(build(32).is_ok());
        assert!(build(255).is_err());
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x9_0000)]).unwrap();
        assert_eq!(write(&mem, 1), Err(MptableError::Write));
    }
}
