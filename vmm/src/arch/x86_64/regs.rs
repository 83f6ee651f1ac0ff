//! Initial vCPU state for the Linux 64-bit boot protocol: general registers, segment and
//! control registers, FPU, boot MSRs and the local APIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, Msrs};
use kvm_ioctls::VcpuFd;

use super::gdt::{
    kvm_segment_from_gdt, BOOT_CS_SELECTOR, BOOT_DS_SELECTOR, BOOT_GDT, BOOT_TSS_SELECTOR,
};
use super::layout::{BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, ZERO_PAGE_START};

/// Errors setting up vCPU registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A KVM register ioctl failed.
    #[error("cannot {what}")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM accepted fewer MSRs than we passed.
    #[error("KVM set only {set} of {wanted} boot MSRs")]
    Msrs {
        /// How many were set.
        set: usize,
        /// How many we asked for.
        wanted: usize,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { what, source }
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// General registers: entry point, boot stack, `rsi` = zero page.
pub fn setup_regs(vcpu: &VcpuFd, entry: u64) -> Result<(), RegsError> {
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("set general registers"))
}

/// Segment and control registers: our GDT, paging with the identity map at `cr3`, long mode.
pub fn setup_sregs(vcpu: &VcpuFd, cr3: u64) -> Result<(), RegsError> {
    let mut sregs = vcpu.get_sregs().map_err(kvm("get special registers"))?;
    let code = kvm_segment_from_gdt(BOOT_GDT[2], BOOT_CS_SELECTOR);
    let data = kvm_segment_from_gdt(BOOT_GDT[3], BOOT_DS_SELECTOR);
    let tss = kvm_segment_from_gdt(BOOT_GDT[4], BOOT_TSS_SELECTOR);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.cr3 = cr3;
    sregs.cr4 = X86_CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(kvm("set special registers"))
}

/// FPU control word and MXCSR at their reset values.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("set FPU state"))
}

/// The MSRs a booting Linux expects zeroed or enabled.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let wanted = entries.len();
    let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::Msrs { set: 0, wanted })?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("set MSRs"))?;
    if set != wanted {
        return Err(RegsError::Msrs { set, wanted });
    }
    Ok(())
}

/// Local APIC: LINT0 delivers ExtINT (the PIC), LINT1 delivers NMI, as on a PC.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), RegsError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_NMI: u32 = 0x4;
    const APIC_MODE_EXTINT: u32 = 0x7;

    fn set_lvt(regs: &mut [std::os::raw::c_char], offset: usize, mode: u32) {
        let mut raw = [0u8; 4];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = regs[offset + i] as u8;
        }
        let value = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            regs[offset + i] = *b as std::os::raw::c_char;
        }
    }

    let mut lapic = vcpu.get_lapic().map_err(kvm("get LAPIC"))?;
    set_lvt(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(kvm("set LAPIC"))
}
