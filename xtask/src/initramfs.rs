//! The guest initramfs: a newc cpio archive holding the agent as `/init` and
//! the few directories and device nodes the kernel and the agent need before
//! any filesystem is mounted. Every entry has fixed metadata (owner root,
//! mtime 0), so the same agent binary always gives the same archive bytes.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context};
use cpio::NewcBuilder;

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

enum Entry<'a> {
    Dir(&'a str, u32),
    File(&'a str, u32, &'a [u8]),
    CharDev(&'a str, u32, u32, u32),
}

/// Writes the initramfs for `agent` to `path` (atomically).
pub fn write(path: &Path, agent: &[u8]) -> anyhow::Result<()> {
    let bytes = archive(agent)?;
    let tmp = path.with_extension("cpio.tmp");
    std::fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

fn archive(agent: &[u8]) -> anyhow::Result<Vec<u8>> {
    // The kernel opens /dev/console for init's stdio before init runs, so
    // the node must be in the archive; the agent mounts devtmpfs over /dev.
    let entries = [
        Entry::Dir("dev", 0o755),
        Entry::CharDev("dev/console", 0o600, 5, 1),
        Entry::Dir("proc", 0o755),
        Entry::Dir("sys", 0o755),
        Entry::Dir("run", 0o755),
        Entry::Dir("tmp", 0o1777),
        Entry::File("init", 0o755, agent),
    ];
    let mut out = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        let ino = u32::try_from(index + 1)?;
        let base = |name: &str| NewcBuilder::new(name).ino(ino).uid(0).gid(0).mtime(0);
        let (builder, data): (NewcBuilder, &[u8]) = match entry {
            Entry::Dir(name, mode) => (base(name).mode(S_IFDIR | mode).nlink(2), &[]),
            Entry::File(name, mode, data) => (base(name).mode(S_IFREG | mode).nlink(1), data),
            Entry::CharDev(name, mode, major, minor) => (
                base(name)
                    .mode(S_IFCHR | mode)
                    .nlink(1)
                    .rdev_major(*major)
                    .rdev_minor(*minor),
                &[],
            ),
        };
        let len = u32::try_from(data.len()).context("file too large for cpio")?;
        // `Vec<u8>` as a writer appends, entry after entry.
        let mut writer = builder.write(&mut out, len);
        writer.write_all(data)?;
        writer.finish()?;
    }
    cpio::newc::trailer(&mut out)?;
    Ok(out)
}

/// Whether an ELF64 executable names a program interpreter (is dynamic).
pub fn has_interpreter(elf: &[u8]) -> anyhow::Result<bool> {
    const PT_INTERP: u32 = 3;
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 {
        bail!("not an ELF64 file");
    }
    let u16_at = |off: usize| u16::from_le_bytes([elf[off], elf[off + 1]]);
    let u64_at = |off: usize| -> anyhow::Result<u64> {
        let bytes = elf.get(off..off + 8).context("truncated ELF")?;
        Ok(u64::from_le_bytes(bytes.try_into()?))
    };
    let phoff = usize::try_from(u64_at(0x20)?)?;
    let phentsize = usize::from(u16_at(0x36));
    let phnum = usize::from(u16_at(0x38));
    for i in 0..phnum {
        let off = phoff + i * phentsize;
        let p_type = elf.get(off..off + 4).context("truncated program header")?;
        if u32::from_le_bytes(p_type.try_into()?) == PT_INTERP {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cpio::NewcReader;
    use std::io::Cursor;

    #[test]
    fn archive_is_reproducible_and_complete() {
        let a = archive(b"agent bytes").unwrap();
        assert_eq!(a, archive(b"agent bytes").unwrap());

        let mut names = Vec::new();
        let mut rest = Cursor::new(a);
        loop {
            let reader = NewcReader::new(rest).unwrap();
            if reader.entry().is_trailer() {
                break;
            }
            let e = reader.entry();
            names.push((e.name().to_owned(), e.mode(), e.mtime(), e.uid()));
            if e.name() == "dev/console" {
                assert_eq!((e.rdev_major(), e.rdev_minor()), (5, 1));
            }
            rest = reader.finish().unwrap();
        }
        assert!(names
            .iter()
            .all(|(_, _, mtime, uid)| *mtime == 0 && *uid == 0));
        let init = names.iter().find(|(n, ..)| n == "init").unwrap();
        assert_eq!(init.1, S_IFREG | 0o755);
        assert!(names.iter().any(|(n, ..)| n == "dev/console"));
    }

    #[test]
    fn detects_dynamic_executables() {
        let own = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        // Test binaries are linked dynamically against the host's libc.
        assert!(has_interpreter(&own).unwrap());
        assert!(has_interpreter(b"not an elf").is_err());
    }
}
