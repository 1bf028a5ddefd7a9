//! A meter's object list with the scalers and units of its registers, read once and kept in
//! `{data_dir}/dlms/{meter}.objects`, beside the invocation counter.
//!
//! Both are static per object (they change with a firmware update or a reconfiguration, and
//! then a GET says an object is undefined, or a value no longer fits its scaler): a poll
//! reads only what changes, and a restart reads no object list.
//!
//! # Invariant
//!
//! The file is only a cache: it holds either the old or the new list whole (written
//! atomically: a temporary file, fsynced, renamed over it, the directory fsynced), and a file
//! that is missing or does not decode (a torn disk, an older format) is ignored with a
//! warning: the list is read from the meter again. Losing it costs one round trip, never a
//! value, so a write that fails is a warning and the list stays cached in memory.
//!
//! The encoding is JSON (serde_json): the file is a few kilobytes written only when the list
//! or a scaler changes, so size and speed do not matter, while an operator commissioning a
//! meter can read it (`cat`), and a format change is caught by its `format` field rather
//! than decoded into the wrong fields, as a positional binary encoding such as postcard
//! could.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::cosem::{ObjectListEntry, ScalerUnit};
use super::counter::meter_file;

/// The version of the file's layout; a file of another is read again from the meter.
const FORMAT: u32 = 1;

/// One object of the list, with its scaler and unit once read (registers only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Known {
    #[serde(flatten)]
    pub entry: ObjectListEntry,
    pub scaler: Option<ScalerUnit>,
}

impl From<ObjectListEntry> for Known {
    fn from(entry: ObjectListEntry) -> Self {
        Known {
            entry,
            scaler: None,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct File {
    format: u32,
    objects: Vec<Known>,
}

#[derive(Debug, Default)]
struct State {
    /// Whether the file was looked at (once per process).
    loaded: bool,
    objects: Option<Vec<Known>>,
}

/// A meter's cached object list, shared by its polls (one association at a time uses it).
#[derive(Clone, Debug)]
pub struct ObjectCache {
    path: PathBuf,
    state: Arc<Mutex<State>>,
}

impl ObjectCache {
    pub fn new(path: PathBuf) -> Self {
        ObjectCache {
            path,
            state: Arc::default(),
        }
    }

    /// `{data_dir}/dlms/{meter}.objects`.
    pub fn for_meter(data_dir: &Path, meter: &str) -> Self {
        ObjectCache::new(meter_file(data_dir, meter, "objects"))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cached list: from memory, or from the file at the first use.
    pub fn get(&self) -> Option<Vec<Known>> {
        let mut s = self.state.lock().ok()?;
        if !s.loaded {
            s.loaded = true;
            s.objects = self.load();
        }
        s.objects.clone()
    }

    fn load(&self) -> Option<Vec<Known>> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "Cannot read the cached DLMS object list, reading it from the meter");
                return None;
            }
        };
        match serde_json::from_slice::<File>(&bytes) {
            Ok(f) if f.format == FORMAT => Some(f.objects),
            Ok(f) => {
                tracing::warn!(path = %self.path.display(), format = f.format, "Cached DLMS object list of another format ignored, reading it from the meter");
                None
            }
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "Cached DLMS object list does not decode, reading it from the meter");
                None
            }
        }
    }

    /// Replaces the list, in memory and on disk. A write that fails is logged: the list
    /// stays cached for the process and the next change tries again.
    pub fn set(&self, objects: Vec<Known>) {
        let bytes = match serde_json::to_vec(&File {
            format: FORMAT,
            objects: objects.clone(),
        }) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "Cannot encode the DLMS object list");
                Vec::new()
            }
        };
        if let Ok(mut s) = self.state.lock() {
            s.loaded = true;
            s.objects = Some(objects);
        }
        if bytes.is_empty() {
            return;
        }
        let written = match self.path.parent() {
            Some(dir) => crate::store::disk::create_dir_durably(dir),
            None => Ok(()),
        }
        .and_then(|()| crate::store::disk::write_atomically(&self.path, &bytes));
        if let Err(e) = written {
            tracing::warn!(path = %self.path.display(), error = %e, "Cannot write the DLMS object list, kept in memory only");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::Obis;

    fn list() -> Vec<Known> {
        vec![
            Known {
                entry: ObjectListEntry {
                    class: 3,
                    version: 0,
                    obis: Obis([1, 0, 1, 8, 0, 255]),
                },
                scaler: Some(ScalerUnit {
                    scaler: -1,
                    unit: 30,
                }),
            },
            ObjectListEntry {
                class: 8,
                version: 0,
                obis: Obis([0, 0, 1, 0, 0, 255]),
            }
            .into(),
        ]
    }

    #[test]
    fn restart_should_find_the_list_and_scalers_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let c = ObjectCache::for_meter(dir.path(), "LGZ/1");
        assert_eq!(c.get(), None);
        c.set(list());
        assert!(c.path().ends_with("dlms/LGZ_1.objects"));
        let again = ObjectCache::for_meter(dir.path(), "LGZ/1");
        assert_eq!(again.get(), Some(list()));
    }

    #[test]
    fn file_that_does_not_decode_should_be_ignored_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let c = ObjectCache::for_meter(dir.path(), "m");
        std::fs::create_dir_all(c.path().parent().unwrap()).unwrap();
        for garbage in [&b"\x00\xff{not json"[..], br#"{"format":99,"objects":[]}"#] {
            std::fs::write(c.path(), garbage).unwrap();
            assert_eq!(ObjectCache::for_meter(dir.path(), "m").get(), None);
        }
        c.set(list());
        assert_eq!(ObjectCache::for_meter(dir.path(), "m").get(), Some(list()));
    }
}
