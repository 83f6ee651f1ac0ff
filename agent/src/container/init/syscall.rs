//! The system calls that set up a container's root filesystem, behind a
//! trait (as youki's libcontainer does), so that the order and arguments of
//! mounts can be checked without root and without touching the host.

#[cfg(test)]
use std::cell::RefCell;
use std::path::Path;
#[cfg(test)]
use std::path::PathBuf;

use nix::mount::{MntFlags, MsFlags};
use nix::sys::stat::{Mode, SFlag};

/// The kernel interface the root filesystem setup needs.
pub trait Syscall {
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> nix::Result<()>;
    fn umount2(&self, target: &Path, flags: MntFlags) -> nix::Result<()>;
    fn pivot_root(&self, new_root: &Path, put_old: &Path) -> nix::Result<()>;
    fn chdir(&self, path: &Path) -> nix::Result<()>;
    fn sethostname(&self, name: &str) -> nix::Result<()>;
    fn mknod(&self, path: &Path, kind: SFlag, perm: Mode, dev: u64) -> nix::Result<()>;
}

/// The real thing.
#[derive(Debug, Default)]
pub struct LinuxSyscall;

impl Syscall for LinuxSyscall {
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> nix::Result<()> {
        nix::mount::mount(source, target, fstype, flags, data)
    }

    fn umount2(&self, target: &Path, flags: MntFlags) -> nix::Result<()> {
        nix::mount::umount2(target, flags)
    }

    fn pivot_root(&self, new_root: &Path, put_old: &Path) -> nix::Result<()> {
        nix::unistd::pivot_root(new_root, put_old)
    }

    fn chdir(&self, path: &Path) -> nix::Result<()> {
        nix::unistd::chdir(path)
    }

    fn sethostname(&self, name: &str) -> nix::Result<()> {
        nix::unistd::sethostname(name)
    }

    fn mknod(&self, path: &Path, kind: SFlag, perm: Mode, dev: u64) -> nix::Result<()> {
        nix::sys::stat::mknod(path, kind, perm, dev)
    }
}

/// One recorded call of [`RecordingSyscall`].
#[cfg(test)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Mount {
        source: Option<PathBuf>,
        target: PathBuf,
        fstype: Option<String>,
        flags: MsFlags,
        data: Option<String>,
    },
    Umount(PathBuf),
    PivotRoot(PathBuf),
    Chdir(PathBuf),
    Sethostname(String),
    Mknod(PathBuf, u64),
}

/// A test double: records every call and succeeds; `mknod` creates an
/// empty file so that later steps find the node.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct RecordingSyscall {
    pub calls: RefCell<Vec<Call>>,
}

#[cfg(test)]
impl Syscall for RecordingSyscall {
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> nix::Result<()> {
        self.calls.borrow_mut().push(Call::Mount {
            source: source.map(Path::to_owned),
            target: target.to_owned(),
            fstype: fstype.map(str::to_owned),
            flags,
            data: data.map(str::to_owned),
        });
        Ok(())
    }

    fn umount2(&self, target: &Path, _flags: MntFlags) -> nix::Result<()> {
        self.calls
            .borrow_mut()
            .push(Call::Umount(target.to_owned()));
        Ok(())
    }

    fn pivot_root(&self, new_root: &Path, _put_old: &Path) -> nix::Result<()> {
        self.calls
            .borrow_mut()
            .push(Call::PivotRoot(new_root.to_owned()));
        Ok(())
    }

    fn chdir(&self, path: &Path) -> nix::Result<()> {
        self.calls.borrow_mut().push(Call::Chdir(path.to_owned()));
        Ok(())
    }

    fn sethostname(&self, name: &str) -> nix::Result<()> {
        self.calls
            .borrow_mut()
            .push(Call::Sethostname(name.to_owned()));
        Ok(())
    }

    fn mknod(&self, path: &Path, _kind: SFlag, _perm: Mode, dev: u64) -> nix::Result<()> {
        std::fs::write(path, b"").map_err(|_| nix::errno::Errno::EIO)?;
        self.calls
            .borrow_mut()
            .push(Call::Mknod(path.to_owned(), dev));
        Ok(())
    }
}
