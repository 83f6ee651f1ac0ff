//! Container logs in the CRI format kubelet reads:
//! `<RFC 3339 time> <stdout|stderr> <F|P> <content>\n`, one entry per line
//! of output. A line longer than [`MAX_LINE`] is cut into partial (`P`)
//! entries ending with a full (`F`) one, as containerd does, so one huge
//! line cannot grow the buffer without bound. Output that ends without a
//! newline is written as a full entry when the stream ends.
//!
//! The file is opened for appending and can be reopened (ReopenContainerLog:
//! kubelet rotated it away), so rotation never loses a line.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The longest line written as one entry.
pub const MAX_LINE: usize = 16 * 1024;

/// Errors of log writing.
#[derive(Debug, thiserror::Error)]
#[error("container log {path}: {source}")]
pub struct LogError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// Which output stream an entry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// A container's log file and the unfinished line of each stream.
#[derive(Debug)]
pub struct CriLog {
    path: PathBuf,
    file: File,
    pending: [Vec<u8>; 2],
}

fn open(path: &Path) -> Result<File, LogError> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
        .map_err(|source| LogError {
            path: path.to_owned(),
            source,
        })
}

impl CriLog {
    /// Opens (creating or appending to) the log at `path`. Its directory
    /// is kubelet's and must exist.
    pub fn open(path: &Path) -> Result<Self, LogError> {
        Ok(Self {
            path: path.to_owned(),
            file: open(path)?,
            pending: [Vec::new(), Vec::new()],
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Closes the file and opens `path` again (after kubelet renamed it).
    pub fn reopen(&mut self) -> Result<(), LogError> {
        self.file = open(&self.path)?;
        Ok(())
    }

    /// Writes the complete lines of `data` (after what is pending of the
    /// same stream); keeps the unfinished rest for the next call.
    pub fn write(&mut self, stream: Stream, data: &[u8], now: SystemTime) -> Result<(), LogError> {
        let mut out = Vec::new();
        let pending = &mut self.pending[stream as usize];
        let mut rest = data;
        while !rest.is_empty() {
            match rest.iter().position(|&b| b == b'\n') {
                Some(i) if pending.len() + i <= MAX_LINE => {
                    pending.extend_from_slice(&rest[..i]);
                    entry(&mut out, now, stream, 'F', pending);
                    pending.clear();
                    rest = &rest[i + 1..];
                }
                _ => {
                    let room = MAX_LINE - pending.len();
                    if rest.len() <= room && !rest.contains(&b'\n') {
                        pending.extend_from_slice(rest);
                        break;
                    }
                    let take = room.min(rest.len());
                    pending.extend_from_slice(&rest[..take]);
                    rest = &rest[take..];
                    if pending.len() == MAX_LINE {
                        entry(&mut out, now, stream, 'P', pending);
                        pending.clear();
                    }
                }
            }
        }
        self.append(&out)
    }

    /// Writes what is pending of both streams as full entries (the streams
    /// ended).
    pub fn finish(&mut self, now: SystemTime) -> Result<(), LogError> {
        let mut out = Vec::new();
        for stream in [Stream::Stdout, Stream::Stderr] {
            let pending = &mut self.pending[stream as usize];
            if !pending.is_empty() {
                entry(&mut out, now, stream, 'F', pending);
                pending.clear();
            }
        }
        self.append(&out)
    }

    fn append(&mut self, out: &[u8]) -> Result<(), LogError> {
        if out.is_empty() {
            return Ok(());
        }
        self.file.write_all(out).map_err(|source| LogError {
            path: self.path.clone(),
            source,
        })
    }
}

fn entry(out: &mut Vec<u8>, now: SystemTime, stream: Stream, tag: char, line: &[u8]) {
    let header = format!(
        "{} {} {tag} ",
        humantime::format_rfc3339_nanos(now),
        stream.name()
    );
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(line);
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn t() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 5)
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }

    #[test]
    fn lines_are_tagged_and_timestamped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        let mut log = CriLog::open(&path).unwrap();
        log.write(Stream::Stdout, b"hello\nwor", t()).unwrap();
        log.write(Stream::Stderr, b"oops\n", t()).unwrap();
        log.write(Stream::Stdout, b"ld\n\nend", t()).unwrap();
        log.finish(t()).unwrap();
        assert_eq!(
            lines(&path),
            [
                "2023-11-14T22:13:20.000000005Z stdout F hello",
                "2023-11-14T22:13:20.000000005Z stderr F oops",
                "2023-11-14T22:13:20.000000005Z stdout F world",
                "2023-11-14T22:13:20.000000005Z stdout F ",
                "2023-11-14T22:13:20.000000005Z stdout F end",
            ]
        );
    }

    #[test]
    fn long_lines_are_cut_into_partial_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        let mut log = CriLog::open(&path).unwrap();
        let mut data = vec![b'a'; MAX_LINE * 2 + 10];
        data.push(b'\n');
        // In pieces that do not line up with MAX_LINE.
        for piece in data.chunks(7000) {
            log.write(Stream::Stdout, piece, t()).unwrap();
        }
        let got = lines(&path);
        assert_eq!(got.len(), 3);
        let tags: Vec<&str> = got.iter().map(|l| l.split(' ').nth(2).unwrap()).collect();
        assert_eq!(tags, ["P", "P", "F"]);
        let content: usize = got
            .iter()
            .map(|l| l.splitn(4, ' ').nth(3).unwrap().len())
            .sum();
        assert_eq!(content, MAX_LINE * 2 + 10);
    }

    #[test]
    fn a_line_of_exactly_max_len_is_one_full_entry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        let mut log = CriLog::open(&path).unwrap();
        let mut data = vec![b'b'; MAX_LINE];
        data.push(b'\n');
        log.write(Stream::Stdout, &data, t()).unwrap();
        let got = lines(&path);
        assert_eq!(got.len(), 1);
        assert!(got[0].contains(" stdout F bbb"));
    }

    #[test]
    fn reopen_follows_a_rotated_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        let mut log = CriLog::open(&path).unwrap();
        log.write(Stream::Stdout, b"one\n", t()).unwrap();
        let rotated = dir.path().join("0.log.1");
        std::fs::rename(&path, &rotated).unwrap();
        log.write(Stream::Stdout, b"two\n", t()).unwrap();
        log.reopen().unwrap();
        log.write(Stream::Stdout, b"three\n", t()).unwrap();
        assert_eq!(lines(&rotated).len(), 2);
        let now = lines(&path);
        assert_eq!(now.len(), 1);
        assert!(now[0].ends_with("stdout F three"));
    }

    #[test]
    fn a_missing_directory_is_a_clear_error() {
        let err = CriLog::open(Path::new("/nonexistent/dir/0.log")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/dir/0.log"), "{err}");
    }
}
