//! A meter's object list with the scalers and units of its registers, and the header of each
//! profile read (its columns, capture period and columns' scalers), read once and kept in
//! `{data_dir}/dlms/{meter}.objects`, beside the invocation counter.
//!
//! All are static per object (they change with a firmware update or a reconfiguration, and
//! then a GET says an object is undefined, or a value no longer fits its scaler, or a
//! profile's rows no longer fit its columns): a poll reads only what changes, a profile read
//! only the buffer, and a restart reads no object list.
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
use super::reads::ProfileHeader;
use crate::reading::Obis;

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

/// A profile's header, by the profile's logical name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct CachedProfile {
    obis: Obis,
    #[serde(flatten)]
    header: ProfileHeader,
}

/// `objects` is absent when only profiles were read; `profiles` is absent in the files of
/// agents before profile headers were cached, which stay readable (the same format).
#[derive(Serialize, Deserialize)]
struct File {
    format: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    objects: Option<Vec<Known>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    profiles: Vec<CachedProfile>,
}

#[derive(Debug, Default)]
struct State {
    /// Whether the file was looked at (once per process).
    loaded: bool,
    objects: Option<Vec<Known>>,
    profiles: Vec<CachedProfile>,
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

    /// The state, loaded from the file at the first use.
    fn state(&self) -> Option<std::sync::MutexGuard<'_, State>> {
        let mut s = self.state.lock().ok()?;
        if !s.loaded {
            s.loaded = true;
            if let Some(f) = self.load() {
                s.objects = f.objects;
                s.profiles = f.profiles;
            }
        }
        Some(s)
    }

    /// The cached list: from memory, or from the file at the first use.
    pub fn get(&self) -> Option<Vec<Known>> {
        self.state()?.objects.clone()
    }

    /// The cached header of `profile`.
    pub fn profile(&self, profile: Obis) -> Option<ProfileHeader> {
        let s = self.state()?;
        let p = s.profiles.iter().find(|p| p.obis == profile)?;
        Some(p.header.clone())
    }

    fn load(&self) -> Option<File> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "Cannot read the cached DLMS object list, reading it from the meter");
                return None;
            }
        };
        match serde_json::from_slice::<File>(&bytes) {
            Ok(f) if f.format == FORMAT => Some(f),
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
        let Some(mut s) = self.state() else { return };
        s.objects = Some(objects);
        self.write(&s);
    }

    /// Replaces the header of `profile` (`None`: forgets it), in memory and on disk, as
    /// [`set`](Self::set).
    pub fn set_profile(&self, profile: Obis, header: Option<ProfileHeader>) {
        let Some(mut s) = self.state() else { return };
        s.profiles.retain(|p| p.obis != profile);
        if let Some(header) = header {
            s.profiles.push(CachedProfile {
                obis: profile,
                header,
            });
        }
        self.write(&s);
    }

    fn write(&self, s: &State) {
        let bytes = match serde_json::to_vec(&File {
            format: FORMAT,
            objects: s.objects.clone(),
            profiles: s.profiles.clone(),
        }) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "Cannot encode the DLMS object list");
                return;
            }
        };
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
    use crate::meter::dlms::apdu::CaptureObject;

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

    #[test]
    fn profile_headers_should_be_kept_beside_the_list_and_survive_its_changes() {
        let dir = tempfile::tempdir().unwrap();
        let c = ObjectCache::for_meter(dir.path(), "m");
        let lp = Obis([1, 0, 99, 1, 0, 255]);
        let header = ProfileHeader {
            columns: vec![CaptureObject::CLOCK],
            capture_period_s: 900,
            scalers: vec![None],
        };
        c.set_profile(lp, Some(header.clone()));
        // A profile read before any poll: a header and no list.
        let again = ObjectCache::for_meter(dir.path(), "m");
        assert_eq!(
            (again.get(), again.profile(lp)),
            (None, Some(header.clone()))
        );
        again.set(list());
        let third = ObjectCache::for_meter(dir.path(), "m");
        assert_eq!(third.get(), Some(list()));
        assert_eq!(third.profile(lp), Some(header));
        third.set_profile(lp, None);
        assert_eq!(ObjectCache::for_meter(dir.path(), "m").profile(lp), None);
        // The files of agents before profile headers were cached still decode.
        std::fs::write(c.path(), br#"{"format":1,"objects":[]}"#).unwrap();
        assert_eq!(ObjectCache::for_meter(dir.path(), "m").get(), Some(vec![]));
    }
}
