//! On-disk records of pods and containers, written atomically so that a
//! daemon restart finds them again.
//!
//! Layout: `<state_dir>/<kind>/<id>.json`. A write goes to a temporary file in
//! the same directory, is fsynced, renamed over the record and the directory
//! is fsynced: a crash leaves either the old or the new record, never a mix.
//! On load, a record that does not parse is reported and skipped; it never
//! stops the other records from loading.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Errors of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state record id {0:?} is not a valid file name")]
    InvalidId(String),
    #[error("state I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot encode state record {path}: {source}")]
    Encode {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// A record that could not be loaded.
#[derive(Debug)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: String,
}

/// A directory of JSON records of one kind.
#[derive(Debug, Clone)]
pub struct RecordDir {
    dir: PathBuf,
}

impl RecordDir {
    /// Opens (creating) `<state_dir>/<kind>`.
    pub fn open(state_dir: &Path, kind: &str) -> Result<Self, StateError> {
        let dir = state_dir.join(kind);
        std::fs::create_dir_all(&dir).map_err(|source| StateError::Io {
            path: dir.clone(),
            source,
        })?;
        Ok(Self { dir })
    }

    fn path_of(&self, id: &str) -> Result<PathBuf, StateError> {
        let valid = !id.is_empty()
            && id.len() <= 128
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            && !id.starts_with('.');
        if !valid {
            return Err(StateError::InvalidId(id.to_owned()));
        }
        Ok(self.dir.join(format!("{id}.json")))
    }

    /// Writes the record `id` atomically.
    pub fn save<T: Serialize>(&self, id: &str, record: &T) -> Result<(), StateError> {
        let path = self.path_of(id)?;
        let bytes = serde_json::to_vec_pretty(record).map_err(|source| StateError::Encode {
            path: path.clone(),
            source,
        })?;
        let tmp = self.dir.join(format!(".{id}.json.tmp"));
        let io = |source| StateError::Io {
            path: path.clone(),
            source,
        };
        let mut file = File::create(&tmp).map_err(io)?;
        file.write_all(&bytes).map_err(io)?;
        file.sync_all().map_err(io)?;
        drop(file);
        std::fs::rename(&tmp, &path).map_err(io)?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok(())
    }

    /// Removes the record `id`; removing an absent record is not an error.
    pub fn remove(&self, id: &str) -> Result<(), StateError> {
        let path = self.path_of(id)?;
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(StateError::Io { path, source }),
        }
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| StateError::Io {
                path: self.dir.clone(),
                source,
            })
    }

    /// Loads every record; unreadable ones are returned as [`Skipped`].
    /// Leftover temporary files of interrupted writes are removed.
    pub fn load_all<T: DeserializeOwned>(&self) -> (Vec<T>, Vec<Skipped>) {
        let mut records = Vec::new();
        let mut skipped = Vec::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) => {
                skipped.push(Skipped {
                    path: self.dir.clone(),
                    reason: e.to_string(),
                });
                return (records, skipped);
            }
        };
        let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for path in paths {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with('.') && name.ends_with(".tmp") {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            if !name.ends_with(".json") {
                continue;
            }
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()))
            {
                Ok(record) => records.push(record),
                Err(reason) => skipped.push(Skipped { path, reason }),
            }
        }
        (records, skipped)
    }

    /// [`load_all`](Self::load_all), logging each record it skips as an unreadable
    /// `what` record (what is unreadable is reported, never fatal).
    pub fn load_all_logged<T: DeserializeOwned>(&self, what: &str) -> Vec<T> {
        let (records, skipped) = self.load_all();
        for s in skipped {
            tracing::error!(
                "skipping unreadable {what} record {}: {}",
                s.path.display(),
                s.reason
            );
        }
        records
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Rec {
        id: String,
        n: u32,
    }

    fn rec(id: &str, n: u32) -> Rec {
        Rec { id: id.into(), n }
    }

    #[test]
    fn save_load_remove_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordDir::open(dir.path(), "pods").unwrap();
        store.save("a", &rec("a", 1)).unwrap();
        store.save("b", &rec("b", 2)).unwrap();
        store.save("a", &rec("a", 3)).unwrap();
        let (mut all, skipped) = store.load_all::<Rec>();
        all.sort_by(|x, y| x.id.cmp(&y.id));
        assert_eq!(all, vec![rec("a", 3), rec("b", 2)]);
        assert!(skipped.is_empty());
        store.remove("a").unwrap();
        store.remove("a").unwrap();
        assert_eq!(store.load_all::<Rec>().0, vec![rec("b", 2)]);
    }

    #[test]
    fn corrupt_records_are_skipped_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordDir::open(dir.path(), "pods").unwrap();
        store.save("good", &rec("good", 1)).unwrap();
        std::fs::write(
            dir.path().join("pods/bad.json"),
            b"{\"id\": \"bad\", \"n\":",
        )
        .unwrap();
        std::fs::write(dir.path().join("pods/.half.json.tmp"), b"{").unwrap();
        let (all, skipped) = store.load_all::<Rec>();
        assert_eq!(all, vec![rec("good", 1)]);
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].path.ends_with("bad.json"));
        assert!(!dir.path().join("pods/.half.json.tmp").exists());
    }

    #[test]
    fn ids_cannot_escape_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordDir::open(dir.path(), "pods").unwrap();
        for bad in ["", "../x", "a/b", ".hidden", &"x".repeat(200)] {
            assert!(matches!(
                store.save(bad, &rec("x", 0)),
                Err(StateError::InvalidId(_))
            ));
        }
    }
}
