//! What the host offers for running VMs.

use std::path::Path;

/// The kind of KVM the host offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmKind {
    /// `/dev/kvm` backed by VMX or SVM: real Linux guests run at full speed.
    Hardware,
    /// `/dev/kvm` backed by PVM (pagetable-based, software): ordinary Linux
    /// guests do not boot under it.
    Pvm,
    /// No usable `/dev/kvm`.
    None,
}

impl KvmKind {
    /// Probes the running host.
    pub fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Self::from_facts(
            Path::new("/dev/kvm").exists(),
            Path::new("/sys/module/kvm_pvm").exists(),
            cpu_has_virt_flag(&cpuinfo),
        )
    }

    fn from_facts(dev_kvm: bool, pvm_module: bool, virt_flag: bool) -> Self {
        match (dev_kvm, pvm_module, virt_flag) {
            (false, _, _) => KvmKind::None,
            (true, true, _) => KvmKind::Pvm,
            (true, false, true) => KvmKind::Hardware,
            // /dev/kvm without VMX/SVM and without PVM: nothing we can use.
            (true, false, false) => KvmKind::None,
        }
    }

    /// One sentence an operator can read.
    pub fn describe(self) -> &'static str {
        match self {
            KvmKind::Hardware => "hardware KVM (VMX/SVM)",
            KvmKind::Pvm => "software PVM KVM, which cannot boot a Linux guest",
            KvmKind::None => "no usable /dev/kvm",
        }
    }
}

fn cpu_has_virt_flag(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split_whitespace())
        .any(|f| f == "vmx" || f == "svm")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_hosts() {
        assert_eq!(KvmKind::from_facts(false, false, true), KvmKind::None);
        assert_eq!(KvmKind::from_facts(true, true, false), KvmKind::Pvm);
        assert_eq!(KvmKind::from_facts(true, false, true), KvmKind::Hardware);
        assert_eq!(KvmKind::from_facts(true, false, false), KvmKind::None);
    }

    #[test]
    fn finds_virt_flags() {
        assert!(cpu_has_virt_flag("flags\t\t: fpu vme svm sse\n"));
        assert!(cpu_has_virt_flag("processor: 0\nflags : vmx\n"));
        assert!(!cpu_has_virt_flag("flags : fpu vme sse svm_lock\n"));
        assert!(!cpu_has_virt_flag("model name : vmx\n"));
    }
}
