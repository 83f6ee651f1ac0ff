//! x86_64: memory layout, boot protocol, GDT and page tables, registers, CPUID.

pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod regs;
