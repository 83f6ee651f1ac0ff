//! VM state owned by KVM: guest memory, the VM and its vCPUs.

pub mod memory;
pub mod vcpu;
pub mod vm;
