//! Seccomp filters, one per thread kind, after Firecracker: written as seccompiler JSON in
//! `vmm/seccomp/x86_64.json`, compiled to BPF by `build.rs` and embedded in the binary (no
//! JSON at run time), and installed by each thread on itself before it does its real work:
//! a vCPU before its first `KVM_RUN`, the event loop before it serves anything, the signal
//! thread before `sigwait`, a vhost-user watchdog before it waits for a deadline, the jail's
//! supervisor before it waits for the VMM.
//!
//! A syscall outside the list traps (`SECCOMP_RET_TRAP`): our SIGSYS handler writes which
//! thread kind made which syscall to stderr and ends the whole process with exit status
//! [`BAD_SYSCALL_EXIT`], as Firecracker does (its status is 148 too). Killing only the thread
//! would leave a half-dead VM; killing the process silently (`kill_process`) would not say
//! which syscall was missing.

use std::cell::Cell;
use std::sync::OnceLock;

use seccompiler::{sock_filter, BpfProgram};

include!(concat!(env!("OUT_DIR"), "/seccomp_filters.rs"));

/// Exit status of a process whose thread made a forbidden syscall (Firecracker's value).
pub const BAD_SYSCALL_EXIT: i32 = 148;

/// Errors preparing or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The embedded program is missing or malformed (a build problem).
    #[error("no valid embedded seccomp filter for the {0} thread")]
    Missing(&'static str),
    /// The SIGSYS handler cannot be installed.
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(#[source] vmm_sys_util::errno::Error),
    /// `prctl(PR_SET_NO_NEW_PRIVS)` or `seccomp(SET_MODE_FILTER)` failed.
    #[error("cannot install the seccomp filter of the {kind} thread: {source}")]
    Install {
        /// The thread kind.
        kind: &'static str,
        /// Why.
        #[source]
        source: seccompiler::Error,
    },
}

/// The kinds of thread the VMM runs, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU thread: `KVM_RUN` and device emulation of PIO/MMIO exits.
    Vcpu,
    /// The event loop, which is also the main thread: devices, control API, teardown.
    Vmm,
    /// The `sigwait` thread that turns SIGTERM/SIGINT into a stop request.
    Signals,
    /// A vhost-user connection's watchdog: cuts the connection of a backend that does not
    /// answer in time.
    Watchdog,
    /// The jail's outer process: forwards signals to the jailed VMM and reaps it.
    Supervisor,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 5] = [
        Self::Vcpu,
        Self::Vmm,
        Self::Signals,
        Self::Watchdog,
        Self::Supervisor,
    ];

    /// Its name in the JSON file.
    pub fn name(self) -> &'static str {
        match self {
            Self::Vcpu => "vcpu",
            Self::Vmm => "vmm",
            Self::Signals => "signals",
            Self::Watchdog => "watchdog",
            Self::Supervisor => "supervisor",
        }
    }
}

/// The compiled filter of `kind`, decoded from the embedded bytes.
pub fn filter(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let bytes = FILTERS
        .iter()
        .find(|(name, _)| *name == kind.name())
        .map(|(_, b)| *b)
        .filter(|b| !b.is_empty() && b.len() % 8 == 0)
        .ok_or(SeccompError::Missing(kind.name()))?;
    Ok(bytes
        .chunks_exact(8)
        .map(|c| sock_filter {
            code: u16::from_le_bytes([c[0], c[1]]),
            jt: c[2],
            jf: c[3],
            k: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
        })
        .collect())
}

thread_local! {
    /// The kind of filter this thread installed, for the SIGSYS message.
    static KIND: Cell<&'static str> = const { Cell::new("unfiltered") };
}

/// Installs `program` (from [`filter`]) on the calling thread, for good. Threads the caller
/// spawns afterwards inherit it.
pub fn apply(kind: ThreadKind, program: &BpfProgram) -> Result<(), SeccompError> {
    install_sigsys_handler()?;
    KIND.with(|k| k.set(kind.name()));
    seccompiler::apply_filter(program).map_err(|source| SeccompError::Install {
        kind: kind.name(),
        source,
    })
}

/// [`filter`] then [`apply`].
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    apply(kind, &filter(kind)?)
}

/// Installs the process-wide SIGSYS handler (once).
pub fn install_sigsys_handler() -> Result<(), SeccompError> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, sigsys_handler)
                .map_err(|e| e.errno())
        })
        .map_err(|errno| SeccompError::Handler(vmm_sys_util::errno::Error::new(errno)))
}

/// Offset of `si_syscall` in a SIGSYS `siginfo_t`, in `i32`s: after `si_signo`, `si_errno`,
/// `si_code`, padding and the 8-byte `si_call_addr` (Firecracker reads it the same way).
const SI_OFF_SYSCALL: usize = 6;

/// Appends the decimal form of `n` to `buf` at `at`; returns the new end.
fn put_decimal(buf: &mut [u8], mut at: usize, n: i32) -> usize {
    let mut digits = [0u8; 12];
    let mut len = 0;
    let mut v = i64::from(n).unsigned_abs();
    loop {
        digits[len] = b'0' + (v % 10) as u8;
        len += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if n < 0 && at < buf.len() {
        buf[at] = b'-';
        at += 1;
    }
    for d in digits[..len].iter().rev() {
        if at < buf.len() {
            buf[at] = *d;
            at += 1;
        }
    }
    at
}

fn put(buf: &mut [u8], at: usize, s: &[u8]) -> usize {
    let n = s.len().min(buf.len().saturating_sub(at));
    buf[at..at + n].copy_from_slice(&s[..n]);
    at + n
}

/// Async-signal-safe: no allocation, no locks; `write` and `_exit` only.
extern "C" fn sigsys_handler(num: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    if num != libc::SIGSYS || info.is_null() {
        return;
    }
    // SAFETY: for an SA_SIGINFO handler the kernel passes a valid siginfo_t; for a seccomp
    // SIGSYS the syscall number is the i32 at SI_OFF_SYSCALL (see the constant).
    let nr = unsafe { *(info as *const i32).add(SI_OFF_SYSCALL) };
    let kind = KIND.with(|k| k.get());
    let mut buf = [0u8; 160];
    let mut at = put(&mut buf, 0, b"carapace-vmm: seccomp: the ");
    at = put(&mut buf, at, kind.as_bytes());
    at = put(&mut buf, at, b" thread made forbidden syscall ");
    at = put_decimal(&mut buf, at, nr);
    at = put(&mut buf, at, b"; exiting\n");
    // SAFETY: write(2) and _exit(2) are async-signal-safe; `buf[..at]` is initialised.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), at);
        libc::_exit(BAD_SYSCALL_EXIT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Forks; the child installs `kind`'s filter and runs `body` (raw syscalls only), then
    /// exits 0. Returns the child's wait status.
    fn in_filtered_child(kind: ThreadKind, body: fn()) -> libc::c_int {
        let prog = filter(kind).unwrap();
        install_sigsys_handler().unwrap();
        // SAFETY: the child only makes raw syscalls (the program is prepared above, nothing
        // allocates) and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            if apply(kind, &prog).is_err() {
                // SAFETY: leaving the forked child.
                unsafe { libc::_exit(99) };
            }
            body();
            // SAFETY: leaving the forked child.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child with a valid out-pointer.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        status
    }

    fn exit_code(status: libc::c_int) -> i32 {
        assert!(libc::WIFEXITED(status), "child did not exit: {status:#x}");
        libc::WEXITSTATUS(status)
    }

    fn assert_allowed(kind: ThreadKind, body: fn()) {
        assert_eq!(exit_code(in_filtered_child(kind, body)), 0, "{kind:?}");
    }

    fn assert_forbidden(kind: ThreadKind, body: fn()) {
        assert_eq!(
            exit_code(in_filtered_child(kind, body)),
            BAD_SYSCALL_EXIT,
            "{kind:?}"
        );
    }

    fn socket_unix() {
        // SAFETY: raw syscall with plain integer arguments.
        unsafe { libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0) };
    }

    fn socket_inet() {
        // SAFETY: raw syscall with plain integer arguments.
        unsafe { libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0) };
    }

    fn execve() {
        // SAFETY: null path: fails with EFAULT if it were allowed.
        unsafe { libc::syscall(libc::SYS_execve, 0usize, 0usize, 0usize) };
    }

    fn openat() {
        // SAFETY: null path: fails with EFAULT if it were allowed.
        unsafe { libc::syscall(libc::SYS_openat, libc::AT_FDCWD, 0usize, 0) };
    }

    fn kvm_run_on_bad_fd() {
        // SAFETY: an ioctl on fd -1 fails with EBADF; the filter only looks at the request.
        unsafe { libc::syscall(libc::SYS_ioctl, -1, 0xae80usize, 0usize) };
    }

    fn tiocgwinsz_on_bad_fd() {
        // SAFETY: as above, a request the vCPU filter does not allow.
        unsafe { libc::syscall(libc::SYS_ioctl, -1, libc::TIOCGWINSZ, 0usize) };
    }

    fn exec_mapping() {
        // SAFETY: an anonymous mapping nobody uses; PROT_EXEC is what the filter refuses.
        unsafe {
            libc::syscall(
                libc::SYS_mmap,
                0usize,
                4096usize,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0usize,
            )
        };
    }

    fn data_mapping() {
        // SAFETY: an anonymous read/write mapping, leaked with the child.
        unsafe {
            libc::syscall(
                libc::SYS_mmap,
                0usize,
                4096usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0usize,
            )
        };
    }

    fn wait4_nohang() {
        // SAFETY: no children: fails with ECHILD if allowed.
        unsafe { libc::syscall(libc::SYS_wait4, -1, 0usize, libc::WNOHANG, 0usize) };
    }

    #[test]
    fn every_kind_has_an_embedded_filter() {
        for kind in ThreadKind::ALL {
            let prog = filter(kind).unwrap();
            assert!(prog.len() > 20, "{kind:?} has {} instructions", prog.len());
        }
    }

    #[test]
    fn vcpu_filter_allows_kvm_run_and_nothing_like_a_socket_or_exec() {
        assert_allowed(ThreadKind::Vcpu, kvm_run_on_bad_fd);
        assert_allowed(ThreadKind::Vcpu, data_mapping);
        assert_forbidden(ThreadKind::Vcpu, socket_unix);
        assert_forbidden(ThreadKind::Vcpu, tiocgwinsz_on_bad_fd);
        assert_forbidden(ThreadKind::Vcpu, openat);
        assert_forbidden(ThreadKind::Vcpu, execve);
        assert_forbidden(ThreadKind::Vcpu, exec_mapping);
    }

    #[test]
    fn event_loop_filter_allows_unix_sockets_only() {
        assert_allowed(ThreadKind::Vmm, socket_unix);
        assert_allowed(ThreadKind::Vmm, data_mapping);
        assert_forbidden(ThreadKind::Vmm, socket_inet);
        assert_forbidden(ThreadKind::Vmm, kvm_run_on_bad_fd);
        assert_forbidden(ThreadKind::Vmm, openat);
        assert_forbidden(ThreadKind::Vmm, execve);
        assert_forbidden(ThreadKind::Vmm, exec_mapping);
    }

    fn punch_hole_on_bad_fd() {
        // SAFETY: fallocate(2) of fd -1 fails with EBADF if allowed.
        unsafe {
            libc::syscall(
                libc::SYS_fallocate,
                -1,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                0usize,
                4096usize,
            )
        };
    }

    fn allocate_on_bad_fd() {
        // SAFETY: as above, with mode 0 (allocate, which could grow a file).
        unsafe { libc::syscall(libc::SYS_fallocate, -1, 0, 0usize, 4096usize) };
    }

    #[test]
    fn event_loop_may_punch_holes_for_the_balloon_but_not_allocate() {
        assert_allowed(ThreadKind::Vmm, punch_hole_on_bad_fd);
        assert_forbidden(ThreadKind::Vmm, allocate_on_bad_fd);
        assert_forbidden(ThreadKind::Vcpu, punch_hole_on_bad_fd);
    }

    #[test]
    fn signal_thread_filter_refuses_everything_else() {
        assert_allowed(ThreadKind::Signals, data_mapping);
        assert_forbidden(ThreadKind::Signals, socket_unix);
        assert_forbidden(ThreadKind::Signals, openat);
        assert_forbidden(ThreadKind::Signals, wait4_nohang);
    }

    fn shutdown_on_bad_fd() {
        // SAFETY: shutdown(2) of fd -1 fails with EBADF if allowed.
        unsafe { libc::syscall(libc::SYS_shutdown, -1, libc::SHUT_RDWR) };
    }

    fn drop_groups_and_keep_ids() {
        // SAFETY: raw syscalls with plain integer arguments (-1: keep that id); in a
        // throwaway child.
        unsafe {
            libc::syscall(libc::SYS_setgroups, 0, 0usize);
            libc::syscall(libc::SYS_setresgid, -1, -1, -1);
            libc::syscall(libc::SYS_setresuid, -1, -1, -1);
        }
    }

    fn set_one_group() {
        let groups: [libc::gid_t; 1] = [0];
        // SAFETY: a valid one-element array; in a throwaway child.
        unsafe { libc::syscall(libc::SYS_setgroups, 1, groups.as_ptr()) };
    }

    #[test]
    fn watchdog_filter_may_cut_a_connection_and_nothing_more() {
        assert_allowed(ThreadKind::Watchdog, shutdown_on_bad_fd);
        // glibc's broadcast of the jail's privilege drop reaches this thread, which exists
        // before it; only clearing the groups is allowed, not setting any.
        assert_allowed(ThreadKind::Watchdog, drop_groups_and_keep_ids);
        assert_forbidden(ThreadKind::Watchdog, set_one_group);
        assert_forbidden(ThreadKind::Vcpu, drop_groups_and_keep_ids);
        assert_allowed(ThreadKind::Watchdog, data_mapping);
        assert_forbidden(ThreadKind::Watchdog, socket_unix);
        assert_forbidden(ThreadKind::Watchdog, openat);
        assert_forbidden(ThreadKind::Watchdog, execve);
        assert_forbidden(ThreadKind::Watchdog, exec_mapping);
        assert_forbidden(ThreadKind::Signals, shutdown_on_bad_fd);
    }

    #[test]
    fn supervisor_filter_may_reap_but_not_open_or_exec() {
        assert_allowed(ThreadKind::Supervisor, wait4_nohang);
        assert_forbidden(ThreadKind::Supervisor, socket_unix);
        assert_forbidden(ThreadKind::Supervisor, openat);
        assert_forbidden(ThreadKind::Supervisor, execve);
        assert_forbidden(ThreadKind::Supervisor, kvm_run_on_bad_fd);
    }

    #[test]
    fn decimal_formatting_for_the_sigsys_message() {
        let mut buf = [0u8; 16];
        let n = put_decimal(&mut buf, 0, 41);
        assert_eq!(&buf[..n], b"41");
        let n = put_decimal(&mut buf, 0, -7);
        assert_eq!(&buf[..n], b"-7");
        let n = put_decimal(&mut buf, 0, 0);
        assert_eq!(&buf[..n], b"0");
    }
}
