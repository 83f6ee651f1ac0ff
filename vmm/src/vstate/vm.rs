//! The KVM VM: memory slots, the in-kernel interrupt controllers (PIC, IOAPIC, LAPIC) and PIT.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::x86_64::layout::KVM_TSS_ADDRESS;

/// Errors creating or setting up the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` cannot be opened.
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// The KVM API is not the stable one.
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    /// A required KVM capability is missing.
    #[error("KVM lacks the {0} capability")]
    MissingCap(&'static str),
    /// A VM ioctl failed.
    #[error("cannot {what}: {source}")]
    Kvm {
        /// Which step.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A region's host address could not be resolved.
    #[error("guest memory region has no host mapping")]
    HostAddress,
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// A KVM VM and the `/dev/kvm` handle it came from.
#[derive(Debug)]
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
}

impl Vm {
    /// Opens `/dev/kvm` and creates a VM, without interrupt controllers yet: register the
    /// guest memory first ([`Self::register_memory`]), then call [`Self::setup_irqchip`].
    pub fn new() -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(VmError::ApiVersion(version));
        }
        for (cap, name) in [
            (kvm_ioctls::Cap::Irqchip, "IRQCHIP"),
            (kvm_ioctls::Cap::Irqfd, "IRQFD"),
            (kvm_ioctls::Cap::Ioeventfd, "IOEVENTFD"),
            (kvm_ioctls::Cap::UserMemory, "USER_MEMORY"),
            (kvm_ioctls::Cap::Pit2, "PIT2"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        let fd = kvm.create_vm().map_err(kvm_err("create the VM"))?;
        Ok(Vm { kvm, fd })
    }

    /// Sets the TSS address and creates the in-kernel irqchip (PIC, IOAPIC, LAPIC) and PIT.
    ///
    /// Called after [`Self::register_memory`], as Firecracker does. The order matters on
    /// PVM hosts: a memory slot registered after the irqchip waits 3–7 ms in
    /// `KVM_SET_USER_MEMORY_REGION` (for an SRCU grace period after the irqchip's I/O-bus
    /// registrations, sleeping, not CPU), one registered before it takes about 0.1 ms.
    pub fn setup_irqchip(&self) -> Result<(), VmError> {
        self.fd
            .set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(kvm_err("set the TSS address"))?;
        self.fd
            .create_irq_chip()
            .map_err(kvm_err("create the irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd
            .create_pit2(pit)
            .map_err(kvm_err("create the PIT"))?;
        Ok(())
    }

    /// The `/dev/kvm` handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Registers every guest memory region as a KVM memory slot.
    ///
    /// The caller must keep `mem` mapped for as long as this VM exists (the [`crate::vmm::Vmm`]
    /// owns both and drops the VM first).
    pub fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| VmError::HostAddress)?;
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the host range is a live mapping of exactly `memory_size` bytes owned by
            // `mem`, which the caller keeps alive for the VM's lifetime (see above).
            unsafe { self.fd.set_user_memory_region(region) }
                .map_err(kvm_err("register guest memory"))?;
        }
        Ok(())
    }
}
