//! `carapace-vmm`: Carapace's KVM microVM monitor. One process runs one pod VM: guest memory
//! in a memfd, vCPU threads, a serial console, an i8042 for reset, and virtio-mmio devices
//! (vsock so far) served by a single epoll event loop.
//!
//! Layout after Firecracker: [`vstate`] (memory, VM, vCPUs), [`arch`] (x86_64 boot
//! protocol), [`devices`] (buses, legacy devices, virtio), [`config`] (the validated JSON
//! configuration), [`builder`] (one function that builds a VM from it) and [`vmm`] (the
//! running VM and its event loop); [`seccomp`] (per-thread syscall filters) and [`jail`]
//! (namespaces, pivot_root, privilege drop) harden the process.

pub mod api;
pub mod arch;
pub mod builder;
pub mod config;
pub mod devices;
pub mod jail;
pub mod seccomp;
pub mod vmm;
pub mod vstate;
