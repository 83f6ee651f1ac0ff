//! CPUID for a Linux guest: KVM's supported set, with the topology and identity leaves made
//! true for this VM (APIC id per vCPU, vCPU count, the hypervisor bit).

use kvm_bindings::CpuId;

/// Bit 31 of leaf 1 ECX: "running under a hypervisor".
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Bit 28 of leaf 1 EDX: more than one logical processor per package.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Bit 24 of leaf 1 ECX: TSC deadline timer. KVM emulates it in its local APIC when it has
/// `KVM_CAP_TSC_DEADLINE_TIMER`, but does not list it in its supported CPUID (it is an
/// emulated feature): the VMM sets it. The guest then arms its timer with one `wrmsr` (an
/// exit KVM handles from the MSR index), where the one-shot APIC timer takes an MMIO write
/// KVM must decode as an instruction.
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;

/// Rewrites `cpuid` (from `KVM_GET_SUPPORTED_CPUID`) for vCPU `cpu_id` of `cpu_count`.
pub fn adjust_for_vcpu(cpuid: &mut CpuId, cpu_id: u8, cpu_count: u8, tsc_deadline: bool) {
    // Bits needed to number `cpu_count` logical processors.
    let shift = u32::BITS - u32::from(cpu_count.max(1) - 1).leading_zeros();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            0x1 => {
                // EBX: [31:24] initial APIC id, [23:16] logical processors, [15:8] CLFLUSH
                // line size in 8-byte units.
                entry.ebx = (u32::from(cpu_id) << 24) | (u32::from(cpu_count) << 16) | (8 << 8);
                entry.ecx |= LEAF1_ECX_HYPERVISOR;
                if tsc_deadline {
                    entry.ecx |= LEAF1_ECX_TSC_DEADLINE;
                } else {
                    entry.ecx &= !LEAF1_ECX_TSC_DEADLINE;
                }
                if cpu_count > 1 {
                    entry.edx |= LEAF1_EDX_HTT;
                } else {
                    entry.edx &= !LEAF1_EDX_HTT;
                }
            }
            0x4 => {
                // Deterministic cache parameters: EAX[31:26] = cores per package - 1. Every
                // cache is shared by all vCPUs (one package, one core per vCPU).
                entry.eax = (entry.eax & 0x03ff_ffff) | (u32::from(cpu_count - 1) << 26);
                entry.eax = (entry.eax & !(0xfff << 14)) | (u32::from(cpu_count - 1) << 14);
            }
            0xb | 0x1f => {
                // Extended topology: level 0 = SMT (one thread per core), level 1 = core.
                entry.edx = u32::from(cpu_id);
                match entry.index {
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = 1 << 8;
                    }
                    1 => {
                        entry.eax = shift;
                        entry.ebx = u32::from(cpu_count);
                        entry.ecx = (2 << 8) | 1;
                    }
                    n => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = n & 0xff;
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn apic_id_and_count_are_per_vcpu() {
        let mut cpuid = CpuId::from_entries(&[leaf(1, 0), leaf(0xb, 0), leaf(0xb, 1)]).unwrap();
        adjust_for_vcpu(&mut cpuid, 2, 3, false);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx >> 24, 2);
        assert_eq!((e[0].ebx >> 16) & 0xff, 3);
        assert_ne!(e[0].ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(e[0].edx & LEAF1_EDX_HTT, 0);
        assert_eq!(e[1].edx, 2);
        assert_eq!((e[2].eax, e[2].ebx), (2, 3));
        assert_eq!(
            e[0].ecx & LEAF1_ECX_TSC_DEADLINE,
            0,
            "not without the capability"
        );
    }

    #[test]
    fn tsc_deadline_follows_the_capability() {
        let mut cpuid = CpuId::from_entries(&[leaf(1, 0)]).unwrap();
        adjust_for_vcpu(&mut cpuid, 0, 1, true);
        assert_ne!(cpuid.as_slice()[0].ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        adjust_for_vcpu(&mut cpuid, 0, 1, false);
        assert_eq!(cpuid.as_slice()[0].ecx & LEAF1_ECX_TSC_DEADLINE, 0);
    }
}
