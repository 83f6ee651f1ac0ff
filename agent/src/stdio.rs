//! A process's stdio as the agent holds it: pipes (stdin, stdout, stderr)
//! or one pseudo-terminal, pumped into a buffer bounded in bytes that the
//! runtime drains with ReadOutput.
//!
//! Output is never dropped: a pump reads its pipe until end of file (every
//! writer gone, including children the process left behind) and waits when
//! the buffer is full, which in turn blocks the writer, as a full pipe
//! would. So the last bytes a process writes before it exits are in the
//! pipe, and reach the reader. The bound is in bytes, not in reads, so how
//! much a process can write ahead of its reader does not depend on how the
//! scheduler happened to split its writes.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use carapace_agent_api::v1::{OutputChunk, OutputStream};
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, Mutex, Semaphore};

/// How many bytes of output may wait for a reader, per process.
pub const OUTPUT_BUFFER_BYTES: usize = 2 * 1024 * 1024;
/// The most one read of a pump takes from its fd.
const CHUNK: usize = 32 * 1024;
/// End of transmission: what closing stdin means on a terminal.
const EOT: u8 = 0x04;

/// Errors of stdio setup and use.
#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    #[error("creating {what}: {source}")]
    Create {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("stdin is closed or was not requested")]
    NoStdin,
    #[error("writing stdin: {0}")]
    Write(std::io::Error),
    #[error("the process has no terminal")]
    NoTerminal,
    #[error("resizing the terminal: {0}")]
    Resize(nix::Error),
    #[error("the output is already being read by another caller")]
    OutputBusy,
}

fn create_err(what: &'static str) -> impl FnOnce(nix::Error) -> StdioError {
    move |e| StdioError::Create {
        what,
        source: e.into(),
    }
}

/// The child's ends: become its fds 0, 1 and 2.
#[derive(Debug)]
pub struct ChildStdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    /// The terminal slave's path in the agent, in terminal mode.
    pub console: Option<PathBuf>,
}

impl ChildStdio {
    /// /dev/null for all three (processes nobody talks to).
    pub fn null() -> Result<ChildStdio, StdioError> {
        let open = || {
            std::fs::File::options()
                .read(true)
                .write(true)
                .open("/dev/null")
                .map(OwnedFd::from)
                .map_err(|source| StdioError::Create {
                    what: "/dev/null",
                    source,
                })
        };
        Ok(ChildStdio {
            stdin: open()?,
            stdout: open()?,
            stderr: open()?,
            console: None,
        })
    }
}

/// The agent's ends of a process's stdio.
#[derive(Debug)]
pub struct ProcessIo {
    stdin: Mutex<Option<Stdin>>,
    output: Arc<Mutex<Output>>,
    terminal: Option<OwnedFd>,
}

/// The reading end of a process's output buffer.
#[derive(Debug)]
pub struct Output {
    rx: mpsc::UnboundedReceiver<OutputChunk>,
    budget: Arc<Semaphore>,
}

impl Output {
    /// The next chunk, or `None` once every pump reached end of file and
    /// everything was read.
    pub async fn recv(&mut self) -> Option<OutputChunk> {
        let chunk = self.rx.recv().await?;
        self.budget.add_permits(chunk.data.len());
        Some(chunk)
    }
}

/// The writing end shared by a process's pumps: a chunk is sent only with
/// as many bytes of budget as it holds, which the reader gives back.
#[derive(Debug, Clone)]
struct OutputSender {
    tx: mpsc::UnboundedSender<OutputChunk>,
    budget: Arc<Semaphore>,
}

fn output_buffer() -> (OutputSender, Output) {
    let (tx, rx) = mpsc::unbounded_channel();
    let budget = Arc::new(Semaphore::new(OUTPUT_BUFFER_BYTES));
    (
        OutputSender {
            tx,
            budget: budget.clone(),
        },
        Output { rx, budget },
    )
}

#[derive(Debug)]
enum Stdin {
    Pipe(AsyncFd<OwnedFd>),
    Terminal(AsyncFd<OwnedFd>),
}

fn set_nonblocking(fd: &OwnedFd) -> nix::Result<()> {
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map(drop)
}

fn pipe() -> Result<(OwnedFd, OwnedFd), StdioError> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(create_err("a pipe"))
}

fn async_fd(fd: OwnedFd) -> Result<AsyncFd<OwnedFd>, StdioError> {
    set_nonblocking(&fd).map_err(create_err("a non-blocking fd"))?;
    // SAFETY: `fd` is an open OwnedFd moved into the AsyncFd, which owns it
    // (and so keeps it open, as the same description) until it is dropped.
    unsafe { AsyncFd::register(fd) }.map_err(|e| StdioError::Create {
        what: "an async fd",
        source: std::io::Error::other(e.to_string()),
    })
}

impl ProcessIo {
    /// Creates the stdio of a new process and starts its output pumps.
    /// `stdin` false gives the process /dev/null (ignored in terminal
    /// mode, where the terminal is its stdin).
    pub fn create(terminal: bool, stdin: bool) -> Result<(ChildStdio, ProcessIo), StdioError> {
        let (tx, rx) = output_buffer();
        if terminal {
            let pty = nix::pty::openpty(None, None).map_err(create_err("a terminal"))?;
            for fd in [&pty.master, &pty.slave] {
                fcntl(fd.as_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
                    .map_err(create_err("a terminal"))?;
            }
            let console = std::fs::read_link(format!("/proc/self/fd/{}", pty.slave.as_raw_fd()))
                .map_err(|source| StdioError::Create {
                    what: "the terminal's path",
                    source,
                })?;
            let dup = |fd: &OwnedFd| {
                fd.try_clone().map_err(|source| StdioError::Create {
                    what: "a terminal fd",
                    source,
                })
            };
            let reader = async_fd(dup(&pty.master)?)?;
            let writer = async_fd(dup(&pty.master)?)?;
            let child = ChildStdio {
                stdin: dup(&pty.slave)?,
                stdout: dup(&pty.slave)?,
                stderr: pty.slave,
                console: Some(console),
            };
            tokio::spawn(pump(reader, OutputStream::Stdout, tx));
            let io = ProcessIo {
                stdin: Mutex::new(Some(Stdin::Terminal(writer))),
                output: Arc::new(Mutex::new(rx)),
                terminal: Some(pty.master),
            };
            return Ok((child, io));
        }
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let (child_stdin, agent_stdin) = if stdin {
            let (r, w) = pipe()?;
            (r, Some(Stdin::Pipe(async_fd(w)?)))
        } else {
            let null = std::fs::File::open("/dev/null").map_err(|source| StdioError::Create {
                what: "/dev/null",
                source,
            })?;
            (OwnedFd::from(null), None)
        };
        tokio::spawn(pump(async_fd(out_r)?, OutputStream::Stdout, tx.clone()));
        tokio::spawn(pump(async_fd(err_r)?, OutputStream::Stderr, tx));
        let child = ChildStdio {
            stdin: child_stdin,
            stdout: out_w,
            stderr: err_w,
            console: None,
        };
        let io = ProcessIo {
            stdin: Mutex::new(agent_stdin),
            output: Arc::new(Mutex::new(rx)),
            terminal: None,
        };
        Ok((child, io))
    }

    /// Writes `data` to stdin, then closes it when `close` is set.
    pub async fn write_stdin(&self, data: &[u8], close: bool) -> Result<(), StdioError> {
        let mut guard = self.stdin.lock().await;
        let stdin = guard.as_ref().ok_or(StdioError::NoStdin)?;
        let fd = match stdin {
            Stdin::Pipe(fd) | Stdin::Terminal(fd) => fd,
        };
        write_all(fd, data).await.map_err(StdioError::Write)?;
        if close {
            if let Stdin::Terminal(fd) = stdin {
                write_all(fd, &[EOT]).await.map_err(StdioError::Write)?;
            }
            *guard = None;
        }
        Ok(())
    }

    /// The output, for one reader at a time.
    pub fn take_output(&self) -> Result<tokio::sync::OwnedMutexGuard<Output>, StdioError> {
        self.output
            .clone()
            .try_lock_owned()
            .map_err(|_| StdioError::OutputBusy)
    }

    /// Sets the terminal's window size.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), StdioError> {
        let fd = self.terminal.as_ref().ok_or(StdioError::NoTerminal)?;
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which
        // points to a live local for the duration of the call.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        if rc != 0 {
            return Err(StdioError::Resize(nix::Error::last()));
        }
        Ok(())
    }
}

async fn write_all(fd: &AsyncFd<OwnedFd>, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        let mut guard = fd.writable().await?;
        match guard
            .try_io(|inner| nix::unistd::write(inner.get_ref(), data).map_err(std::io::Error::from))
        {
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
    Ok(())
}

/// Copies one output fd into the buffer until end of file. A terminal
/// master reports EIO once the last slave fd closed: that is its end.
/// Before each read the pump holds budget for a whole chunk, so it never
/// takes from the fd what the buffer could not hold.
async fn pump(fd: AsyncFd<OwnedFd>, stream: OutputStream, out: OutputSender) {
    const CHUNK_PERMITS: u32 = CHUNK as u32;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let Ok(permit) = out.budget.acquire_many(CHUNK_PERMITS).await else {
            return;
        };
        let mut guard = match fd.readable().await {
            Ok(g) => g,
            Err(_) => return,
        };
        let n = match guard.try_io(|inner| {
            nix::unistd::read(inner.get_ref(), &mut buf).map_err(std::io::Error::from)
        }) {
            Ok(Ok(0)) => return,
            Ok(Ok(n)) => n,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Ok(Err(_)) => return,
            Err(_would_block) => continue,
        };
        // Keep the budget of the bytes sent; the reader gives it back.
        permit.forget();
        out.budget.add_permits(CHUNK - n);
        let chunk = OutputChunk {
            stream: stream as i32,
            data: buf[..n].to_vec(),
        };
        if out.tx.send(chunk).is_err() {
            return;
        }
    }
}
