//! One function, [`build_vm`], turns a validated configuration into a ready-to-start VM.
//! If any step fails, everything created so far is dropped (memfd, KVM fds, sockets).

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::{Arc, Mutex};

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::IoEventAddress;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::{boot, gdt, layout, mptable};
use crate::config::{SerialOutput, ValidatedConfig};
use crate::devices::legacy::{EventFdTrigger, Serial, SerialError, I8042};
use crate::devices::virtio::balloon::Balloon;
use crate::devices::virtio::block::{Block, BlockError};
use crate::devices::virtio::fs::{Fs, FsError};
use crate::devices::virtio::mmio::QUEUE_NOTIFY_OFFSET;
use crate::devices::virtio::net::{Net, NetError};
use crate::devices::virtio::vsock::{Vsock, VsockError};
use crate::devices::virtio::{IrqLine, MmioTransport, VirtioDevice};
use crate::devices::{Bus, BusError};
use crate::seccomp::{self, ThreadKind};
use crate::vmm::{VirtioSlot, Vmm};
use crate::vstate::memory::{create_guest_memory, MemoryError};
use crate::vstate::vcpu::{RunControl, Vcpu, VcpuError, VcpuThread};
use crate::vstate::vm::{Vm, VmError};

/// Errors building the VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The embedded seccomp filter of a thread started while building.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The KVM VM.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Kernel, initrd, command line or boot parameters.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// GDT or page tables.
    #[error(transparent)]
    Gdt(#[from] gdt::GdtError),
    /// The MP table.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// The serial console.
    #[error(transparent)]
    Serial(#[from] SerialError),
    /// The vsock device.
    #[error(transparent)]
    Vsock(#[from] VsockError),
    /// A block device.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// A network interface.
    #[error("network interface {tap}: {source}")]
    Net {
        /// The tap's name.
        tap: String,
        /// Why.
        #[source]
        source: NetError,
    },
    /// A virtio-fs device (its vhost-user backend).
    #[error("virtio-fs `{tag}`: {source}")]
    Fs {
        /// The device's tag.
        tag: String,
        /// Why.
        #[source]
        source: FsError,
    },
    /// Device address ranges.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// vCPU creation.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// An eventfd, irqfd or ioeventfd.
    #[error("cannot set up {what}: {source}")]
    Event {
        /// Which.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Too many devices for the MMIO window or the IOAPIC.
    #[error("too many virtio devices")]
    TooManyDevices,
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> BuildError {
    move |source| BuildError::Event { what, source }
}

fn kvm_io_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BuildError {
    move |e| BuildError::Event {
        what,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

fn new_evt(what: &'static str) -> Result<EventFd, BuildError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(io_err(what))
}

fn serial_output(out: &SerialOutput) -> Result<Box<dyn Write + Send>, SerialError> {
    Ok(match out {
        SerialOutput::None => Box::new(std::io::sink()),
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::File(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| SerialError::Open {
                    path: path.display().to_string(),
                    source,
                })?,
        ),
    })
}

/// Puts a virtio device on the MMIO bus at slot `index`: interrupt via irqfd, queue
/// notifications via ioeventfd. Returns the slot and its command-line entry.
fn attach_virtio(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    mmio: &mut Bus,
    index: usize,
    device: Box<dyn VirtioDevice>,
) -> Result<(VirtioSlot, String), BuildError> {
    let gsi = layout::IRQ_BASE + index as u32;
    if index as u64 >= layout::MMIO_MAX_DEVICES || gsi > layout::IRQ_MAX {
        return Err(BuildError::TooManyDevices);
    }
    let base = layout::mmio_slot(index as u64);
    let irq = IrqLine::new(new_evt("a virtio interrupt eventfd")?);
    vm.fd()
        .register_irqfd(irq.evt(), gsi)
        .map_err(kvm_io_err("a virtio irqfd"))?;
    let transport =
        MmioTransport::new(mem.clone(), device, irq).map_err(io_err("a virtio-mmio transport"))?;
    for (q, evt) in transport.queue_evts().iter().enumerate() {
        vm.fd()
            .register_ioevent(
                evt,
                &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET),
                q as u32,
            )
            .map_err(kvm_io_err("a queue ioeventfd"))?;
    }
    let transport = Arc::new(Mutex::new(transport));
    mmio.insert(transport.clone(), base, layout::MMIO_DEVICE_SIZE)?;
    let entry = format!(
        "virtio_mmio.device={}K@{:#x}:{}",
        layout::MMIO_DEVICE_SIZE / 1024,
        base,
        gsi
    );
    Ok((
        VirtioSlot {
            transport,
            base,
            gsi,
        },
        entry,
    ))
}

/// Builds the VM described by `config`; the vCPUs are created and configured but not
/// started ([`Vmm::start`]).
pub fn build_vm(config: &ValidatedConfig) -> Result<Vmm, BuildError> {
    let cfg = config.get();
    // The vCPU threads start first, so that their creation and seccomp install overlap the
    // rest of the build (on a loaded host a new thread can wait milliseconds for a CPU).
    // Not with a jail: the process changes its uid after the build, and glibc makes every
    // thread do so, which the vCPU filter forbids; `Vmm::start` spawns them then.
    let mut vcpu_threads = Vec::new();
    if cfg.jail.is_none() {
        let filter = if cfg.seccomp {
            Some(Arc::new(seccomp::filter(ThreadKind::Vcpu)?))
        } else {
            None
        };
        for id in 0..cfg.vcpus {
            vcpu_threads.push(VcpuThread::spawn(id, filter.clone())?);
        }
    }
    let mem_size = u64::from(cfg.mem_size_mib) << 20;
    let mem = create_guest_memory(mem_size, cfg.memory_backing())?;
    let vm = Vm::new()?;
    vm.register_memory(&mem)?;
    vm.setup_irqchip()?;

    let kernel = boot::load_kernel(&mem, &cfg.kernel)?;
    let initrd = match &cfg.initrd {
        Some(path) => Some(boot::load_initrd(&mem, path, kernel.end)?),
        None => None,
    };

    // Legacy devices on the port-I/O bus.
    let mut pio = Bus::new();
    let serial_irq = new_evt("the serial interrupt eventfd")?;
    vm.fd()
        .register_irqfd(&serial_irq, layout::SERIAL_IRQ)
        .map_err(kvm_io_err("the serial irqfd"))?;
    let serial = Arc::new(Mutex::new(Serial::new(
        EventFdTrigger::new(serial_irq),
        serial_output(&cfg.serial)?,
    )));
    pio.insert(serial.clone(), u64::from(layout::SERIAL_PORT), 8)?;
    let reset_evt = new_evt("the reset eventfd")?;
    let i8042 = I8042::new(EventFdTrigger::new(
        reset_evt.try_clone().map_err(io_err("the reset eventfd"))?,
    ));
    pio.insert(
        Arc::new(Mutex::new(i8042)),
        u64::from(layout::I8042_PORT),
        5,
    )?;

    // Virtio devices on the MMIO bus.
    let mut mmio = Bus::new();
    let mut slots = Vec::new();
    let mut cmdline_extra = Vec::new();
    if let Some(vsock) = &cfg.vsock {
        let dev = Vsock::new(vsock.guest_cid, &vsock.uds_path)?;
        let (slot, entry) = attach_virtio(&vm, &mem, &mut mmio, slots.len(), Box::new(dev))?;
        slots.push(slot);
        cmdline_extra.push(entry);
    }
    for drive in &cfg.drives {
        let dev = Block::new(&drive.path, drive.read_only)?;
        let (slot, entry) = attach_virtio(&vm, &mem, &mut mmio, slots.len(), Box::new(dev))?;
        slots.push(slot);
        cmdline_extra.push(entry);
    }
    for net in &cfg.net {
        // Validated: the MAC parses.
        let mac = net.mac_bytes().unwrap_or_default();
        let dev = Net::new(&net.tap, mac, net.mtu).map_err(|source| BuildError::Net {
            tap: net.tap.clone(),
            source,
        })?;
        let (slot, entry) = attach_virtio(&vm, &mem, &mut mmio, slots.len(), Box::new(dev))?;
        slots.push(slot);
        cmdline_extra.push(entry);
    }
    if cfg.free_page_reporting {
        let (slot, entry) =
            attach_virtio(&vm, &mem, &mut mmio, slots.len(), Box::new(Balloon::new()))?;
        slots.push(slot);
        cmdline_extra.push(entry);
    }
    // Each connection's watchdog thread filters itself; it starts here, before the event
    // loop's own filter, so it does not inherit one.
    let watchdog_filter = if cfg.seccomp && !cfg.fs.is_empty() {
        Some(Arc::new(seccomp::filter(ThreadKind::Watchdog)?))
    } else {
        None
    };
    for fs in &cfg.fs {
        let dev = Fs::new(fs, watchdog_filter.clone()).map_err(|source| BuildError::Fs {
            tag: fs.tag.clone(),
            source,
        })?;
        let (slot, entry) = attach_virtio(&vm, &mem, &mut mmio, slots.len(), Box::new(dev))?;
        slots.push(slot);
        cmdline_extra.push(entry);
    }

    let cmdline = boot::build_cmdline(&cfg.cmdline, &cmdline_extra)?;
    boot::write_boot_params(&mem, &cmdline, initrd)?;
    gdt::write_gdt_and_idt(&mem)?;
    mptable::write(&mem, cfg.vcpus)?;
    let cr3 = gdt::write_page_tables(&mem)?;

    let pio = Arc::new(pio);
    let mmio = Arc::new(mmio);
    let supported = vm
        .kvm()
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|source| VcpuError::Kvm {
            what: "get the supported CPUID",
            source,
        })?;
    let mut vcpus = Vec::with_capacity(usize::from(cfg.vcpus));
    for id in 0..cfg.vcpus {
        vcpus.push(Vcpu::new(
            &vm,
            &supported,
            id,
            cfg.vcpus,
            kernel.entry.0,
            cr3,
            pio.clone(),
            mmio.clone(),
        )?);
    }

    let exit_evt = new_evt("the exit eventfd")?;
    let control = RunControl::new(exit_evt.try_clone().map_err(io_err("the exit eventfd"))?);
    Ok(Vmm::new(crate::vmm::VmmParts {
        vm,
        mem,
        control,
        exit_evt,
        reset_evt,
        stop_evt: new_evt("the stop eventfd")?,
        vcpus,
        vcpu_threads,
        serial,
        slots,
        cmdline: String::from_utf8_lossy(
            cmdline
                .as_cstring()
                .map_err(boot::BootError::from)?
                .as_bytes(),
        )
        .into_owned(),
        config: cfg.clone(),
    }))
}
