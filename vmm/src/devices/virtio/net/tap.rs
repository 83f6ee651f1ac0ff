//! The tap side of virtio-net: a `/dev/net/tun` queue attached to a named tap interface with
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, a 12-byte vnet header (`TUNSETVNETHDRSZ`, the
//! virtio 1.x header), non-blocking, offloads set with `TUNSETOFFLOAD`.
//!
//! The device talks to it through [`NetBackend`], so unit tests can put a socket pair in its
//! place. Written by hand on `libc` ioctls: three ioctls did not justify a crate (the
//! rust-vmm `net_gen`/tap code lives inside Firecracker and Cloud Hypervisor, not in a
//! published, maintained crate).

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::VNET_HDR_LEN;

/// Errors opening or configuring a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface name is not a valid Linux interface name.
    #[error("invalid tap name {0:?}: 1 to 15 bytes, no '/', whitespace or NUL")]
    InvalidName(String),
    /// `/dev/net/tun` cannot be opened.
    #[error("cannot open /dev/net/tun: {0}")]
    Open(#[source] std::io::Error),
    /// An ioctl on the tap failed.
    #[error("{what} on tap {name} failed: {source}")]
    Ioctl {
        /// Which ioctl.
        what: &'static str,
        /// The interface.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What the net device needs from its host side: whole frames (vnet header first) in and
/// out without blocking, and the offloads it may hand us.
pub trait NetBackend: Send {
    /// Reads one frame (vnet header + Ethernet frame) into `buf`; `WouldBlock` when none.
    fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize>;
    /// Writes one frame (vnet header + Ethernet frame) gathered from `iovs` with one
    /// `writev`. The kernel reads through the pointers; one that points nowhere fails the
    /// call with `EFAULT`, so this is safe whatever they hold.
    fn write_frame(&mut self, iovs: &[libc::iovec]) -> std::io::Result<usize>;
    /// Sets which offloads (`TUN_F_*`) the backend may use in frames it gives us.
    fn set_offload(&mut self, flags: u32) -> std::io::Result<()>;
    /// The fd that becomes readable when a frame is waiting.
    fn raw_fd(&self) -> RawFd;
}

/// `writev(2)` of `iovs` to `fd`.
pub fn writev(fd: RawFd, iovs: &[libc::iovec]) -> std::io::Result<usize> {
    let count = libc::c_int::try_from(iovs.len())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `iovs` is a live slice of `count` iovecs. writev only reads the memory they
    // name, through the kernel, which fails with EFAULT on an address that is not mapped.
    let n = unsafe { libc::writev(fd, iovs.as_ptr(), count) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Whether `name` is a usable Linux interface name (`dev_valid_name`).
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

/// `struct ifreq` with the `ifr_flags` member of its union (40 bytes on x86_64).
#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open tap queue.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the tap interface `name` (creating it if it does not exist, which is what
    /// `TUNSETIFF` does), with a 12-byte vnet header, non-blocking, no offloads yet.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if !valid_ifname(name) {
            return Err(TapError::InvalidName(name.to_owned()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::Open)?;
        let tap = Tap {
            file,
            name: name.to_owned(),
        };
        let mut req = IfReqFlags {
            name: [0; libc::IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` is one (name, flags,
        // padding to the union's 24 bytes), alive and exclusively borrowed for the call.
        let rc = unsafe { libc::ioctl(tap.file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        tap.check(rc, "TUNSETIFF")?;
        let hdr_len: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one `int` through the pointer, which points to a
        // live local.
        let rc = unsafe { libc::ioctl(tap.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) };
        tap.check(rc, "TUNSETVNETHDRSZ")?;
        tap.offload(0)?;
        Ok(tap)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn check(&self, rc: libc::c_int, what: &'static str) -> Result<(), TapError> {
        if rc < 0 {
            return Err(TapError::Ioctl {
                what,
                name: self.name.clone(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    fn offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        self.check(rc, "TUNSETOFFLOAD")
    }
}

impl NetBackend for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }

    fn write_frame(&mut self, iovs: &[libc::iovec]) -> std::io::Result<usize> {
        writev(self.file.as_raw_fd(), iovs)
    }

    fn set_offload(&mut self, flags: u32) -> std::io::Result<()> {
        self.offload(flags).map_err(|e| match e {
            TapError::Ioctl { source, .. } => source,
            other => std::io::Error::other(other.to_string()),
        })
    }

    fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_checked() {
        assert!(valid_ifname("tap0"));
        assert!(valid_ifname("x".repeat(15).as_str()));
        for bad in ["", ".", "..", "a/b", "a b", "a:b", "a\0", &"x".repeat(16)] {
            assert!(!valid_ifname(bad), "{bad:?}");
            assert!(matches!(Tap::open(bad), Err(TapError::InvalidName(_))));
        }
    }

    /// A real tap in a private network namespace (tests run as root): attach, vnet header
    /// size, offloads the guest may ask for, and a frame written by the kernel read back
    /// with its vnet header.
    #[test]
    fn real_tap_in_a_private_netns() {
        std::thread::spawn(|| {
            // SAFETY: unshare(CLONE_NEWNET) only changes this thread's network namespace; the
            // thread ends with the test and holds no other resources.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
            let mut tap = Tap::open("cptest0").expect("open tap");
            assert_eq!(tap.name(), "cptest0");
            let mut buf = [0u8; 2048];
            assert_eq!(
                tap.read_frame(&mut buf).unwrap_err().kind(),
                std::io::ErrorKind::WouldBlock
            );
            let all = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_UFO;
            tap.set_offload(all).expect("offloads");
            tap.set_offload(0).expect("no offloads");
            // A second queue on the same name is refused (not multi-queue).
            assert!(matches!(
                Tap::open("cptest0"),
                Err(TapError::Ioctl {
                    what: "TUNSETIFF",
                    ..
                })
            ));
        })
        .join()
        .unwrap();
    }
}
