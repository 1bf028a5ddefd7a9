//! The client invocation counter of a ciphered meter, durable across restarts.
//!
//! # Invariant
//!
//! A value handed out is below the reservation persisted on disk, and a reservation only
//! grows. The file (`{data_dir}/dlms/{meter}.ic`, decimal text) holds the first value **not**
//! reserved: after a restart, a crash or a power cut the counter continues from it, above
//! every value that can have been sent. Values are reserved in blocks of [`BLOCK`] so that
//! not every ciphered APDU costs an fsync; a restart skips at most the unused rest of a
//! block, which costs nothing (the meter wants increasing values, not consecutive ones).
//!
//! The file is read lazily, at the first value, so resolving a config (`check`) touches no
//! file.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::security::{CounterError, InvocationCounter};

/// How many values one fsync reserves.
pub const BLOCK: u32 = 1000;

#[derive(Debug)]
struct State {
    /// The next value to hand out; `None` until the file was read.
    next: Option<u32>,
    /// The first value not reserved on disk.
    reserved: u32,
}

/// A meter's counter, shared by its polls (one association at a time uses it).
#[derive(Clone, Debug)]
pub struct FileCounter {
    path: PathBuf,
    state: Arc<Mutex<State>>,
}

impl FileCounter {
    pub fn new(path: PathBuf) -> Self {
        FileCounter {
            path,
            state: Arc::new(Mutex::new(State {
                next: None,
                reserved: 0,
            })),
        }
    }

    /// `{data_dir}/dlms/{meter}.ic`; the meter id is made safe for a file name.
    pub fn for_meter(data_dir: &Path, meter: &str) -> Self {
        FileCounter::new(meter_file(data_dir, meter, "ic"))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves the counter to at least `value` (after the meter said it expects more).
    pub fn jump_to(&self, value: u32) -> Result<(), CounterError> {
        let mut s = self.state.lock().map_err(|_| poisoned())?;
        self.load(&mut s)?;
        if s.next.unwrap_or(0) < value {
            s.next = Some(value);
        }
        Ok(())
    }

    fn load(&self, s: &mut State) -> Result<(), CounterError> {
        if s.next.is_some() {
            return Ok(());
        }
        let first = match std::fs::read_to_string(&self.path) {
            Ok(text) => text.trim().parse::<u32>().map_err(|_| {
                // A file we cannot read back may hide values already used: refuse rather
                // than start again at 0.
                CounterError::Store(format!(
                    "{} does not hold a counter; fix or remove it only after renewing the meter's keys",
                    self.path.display()
                ))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => {
                return Err(CounterError::Store(format!(
                    "cannot read {}: {e}",
                    self.path.display()
                )));
            }
        };
        s.next = Some(first);
        s.reserved = first;
        Ok(())
    }
}

/// `{data_dir}/dlms/{meter}.{ext}`, the meter id made safe for a file name: where a meter's
/// durable DLMS state lives (its invocation counter, its object list).
pub fn meter_file(data_dir: &Path, meter: &str, ext: &str) -> PathBuf {
    let name: String = meter
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    data_dir.join("dlms").join(format!("{name}.{ext}"))
}

fn poisoned() -> CounterError {
    CounterError::Store("counter lock poisoned".into())
}

impl InvocationCounter for FileCounter {
    fn next(&mut self) -> Result<u32, CounterError> {
        let mut s = self.state.lock().map_err(|_| poisoned())?;
        self.load(&mut s)?;
        let v = s.next.unwrap_or(0);
        if v == u32::MAX {
            return Err(CounterError::Exhausted);
        }
        if v >= s.reserved {
            let reserved = v.saturating_add(BLOCK);
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| {
                    CounterError::Store(format!("cannot create {}: {e}", dir.display()))
                })?;
            }
            crate::store::disk::write_atomically(&self.path, format!("{reserved}\n").as_bytes())
                .map_err(|e| {
                    CounterError::Store(format!("cannot write {}: {e}", self.path.display()))
                })?;
            s.reserved = reserved;
        }
        s.next = Some(v + 1);
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_should_continue_above_every_value_handed_out() {
        let dir = tempfile::tempdir().unwrap();
        let mut seen = Vec::new();
        let mut c = FileCounter::for_meter(dir.path(), "LGZ/1");
        for _ in 0..1500 {
            seen.push(c.next().unwrap());
        }
        // A restart: a new counter on the same file.
        let mut c2 = FileCounter::for_meter(dir.path(), "LGZ/1");
        let after = c2.next().unwrap();
        assert!(after > *seen.iter().max().unwrap(), "{after} repeats");
        assert_eq!(after, 2000, "continues from the persisted reservation");
        let mut sorted = seen.clone();
        sorted.dedup();
        assert_eq!(sorted.len(), seen.len(), "never repeats within a run");
    }

    #[test]
    fn reservation_should_cost_one_write_per_block() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = FileCounter::for_meter(dir.path(), "m");
        c.next().unwrap();
        let on_disk = std::fs::read_to_string(c.path()).unwrap();
        assert_eq!(on_disk.trim(), "1000");
        for _ in 0..998 {
            c.next().unwrap();
        }
        assert_eq!(std::fs::read_to_string(c.path()).unwrap().trim(), "1000");
        assert_eq!(c.next().unwrap(), 999);
        assert_eq!(c.next().unwrap(), 1000);
        assert_eq!(std::fs::read_to_string(c.path()).unwrap().trim(), "2000");
    }

    #[test]
    fn unreadable_file_should_refuse_rather_than_restart_at_zero() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = FileCounter::for_meter(dir.path(), "m");
        std::fs::create_dir_all(c.path().parent().unwrap()).unwrap();
        std::fs::write(c.path(), "garbage").unwrap();
        assert!(matches!(c.next(), Err(CounterError::Store(_))));
    }

    #[test]
    fn jump_should_skip_past_the_meters_counter() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = FileCounter::for_meter(dir.path(), "m");
        c.next().unwrap();
        c.jump_to(5000).unwrap();
        assert_eq!(c.next().unwrap(), 5000);
        let mut c2 = FileCounter::for_meter(dir.path(), "m");
        assert!(c2.next().unwrap() > 5000);
    }
}
