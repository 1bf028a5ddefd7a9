//! Making what sled wrote survive a power cut, and small durable files beside the store.
//!
//! sled 0.34's `Db::flush()` writes its log buffers with `pwrite` and then calls
//! `sync_file_range(WAIT_BEFORE | WRITE | WAIT_AFTER)` on Linux (`pagecache/iobuf.rs`). That
//! starts and waits for writeback of the data pages, but commits no metadata (a grown file's
//! size, its extents) and flushes no device cache: the man page says outright that it gives no
//! guarantee the data survives a crash (sled issue 1452). The only real fsync sled does is its
//! background flusher's, every `flush_every_ms`. So after every `flush()` that promises
//! durability the store calls [`DiskSync::sync`], which does what sled leaves out:
//!
//! 1. blob files (values too large for the log, in `blobs/`) that are new since the last sync
//!    are `fsync`ed — sled writes them with no sync at all — and then the `blobs` directory;
//! 2. the log file `db` is `fdatasync`ed: its data and the metadata needed to read it back
//!    (size, extents), and the device's write cache with it;
//! 3. if the store directory's entries changed (a new snapshot renamed into place, an old one
//!    removed), the directory is `fsync`ed, as ext4 and every POSIX filesystem require for a
//!    rename or a new name to survive a power cut.
//!
//! Listing the two directories costs two `getdents` calls per sync; the `fdatasync` is the
//! cost that matters, once per batch (one append, one acknowledgement flush), never per record.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Syncs a sled database's files after sled's own flush (see the module doc).
#[derive(Debug)]
pub(crate) struct DiskSync {
    /// The log, opened for reading only: fsync works on the inode, whoever wrote it.
    log: File,
    store_dir: PathBuf,
    /// The entries of the store directory and of `blobs/` as of the last sync.
    seen: Mutex<Seen>,
}

#[derive(Debug, Default)]
struct Seen {
    store: BTreeSet<OsString>,
    blobs: BTreeSet<OsString>,
}

impl DiskSync {
    /// For the sled database in `store_dir`, just opened. Makes the directory itself and
    /// everything in it durable once, so a new store's files are all there after a cut.
    pub(crate) fn open(store_dir: &Path) -> io::Result<DiskSync> {
        let log = File::open(store_dir.join("db"))?;
        let sync = DiskSync {
            log,
            store_dir: store_dir.to_owned(),
            seen: Mutex::new(Seen::default()),
        };
        sync.sync()?;
        // The store directory's own name, in the data directory.
        if let Some(parent) = store_dir.parent() {
            sync_dir(parent)?;
        }
        Ok(sync)
    }

    /// Makes everything sled has flushed so far durable. Call after `Db::flush()` returned.
    pub(crate) fn sync(&self) -> io::Result<()> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let blobs_dir = self.store_dir.join("blobs");
        let blobs = list(&blobs_dir)?;
        if blobs != seen.blobs {
            for name in blobs.difference(&seen.blobs) {
                match File::open(blobs_dir.join(name)) {
                    Ok(f) => f.sync_all()?,
                    // Removed again meanwhile (sled's blob GC): nothing to keep.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
            sync_dir(&blobs_dir)?;
            seen.blobs = blobs;
        }
        self.log.sync_data()?;
        let entries = list(&self.store_dir)?;
        if entries != seen.store {
            sync_dir(&self.store_dir)?;
            seen.store = entries;
        }
        Ok(())
    }
}

fn list(dir: &Path) -> io::Result<BTreeSet<OsString>> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries.map(|e| e.map(|e| e.file_name())).collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BTreeSet::new()),
        Err(e) => Err(e),
    }
}

/// Makes the entries of a directory durable: new names, renames and removals in it.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` and any missing parents so that their names survive a power cut: each new
/// directory's parent is fsynced.
pub fn create_dir_durably(dir: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut at = Some(dir);
    while let Some(d) = at {
        if d.as_os_str().is_empty() || d.exists() {
            break;
        }
        missing.push(d.to_owned());
        at = d.parent();
    }
    std::fs::create_dir_all(dir)?;
    for d in missing.iter().rev() {
        if let Some(parent) = d.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

/// Replaces `path` with `contents` so that after a power cut it holds either the old or the
/// new contents, whole: a temporary file beside it, fsynced, renamed over it, and the
/// directory fsynced.
pub fn write_atomically(path: &Path, contents: &[u8]) -> io::Result<()> {
    write_atomically_mode(path, contents, None)
}

/// [`write_atomically`], the new file created with permission bits `mode` (before the umask)
/// instead of 0666: a config that may hold a secret keeps the permissions of the one it
/// replaces, with no moment in which it is readable by more.
pub fn write_atomically_mode(path: &Path, contents: &[u8], mode: Option<u32>) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".tmp");
    let tmp = dir.join(name);
    // A temporary left by a crash may have other permissions: start afresh.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode.unwrap_or(0o666))
        .open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    sync_dir(dir)
}

/// Renames `from` to `to` (in the same filesystem) durably: the directories of both are
/// fsynced.
pub fn rename_durably(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::rename(from, to)?;
    let parent = |p: &Path| match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let (a, b) = (parent(from), parent(to));
    sync_dir(&a)?;
    if a != b {
        sync_dir(&b)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomically_should_replace_the_whole_file_and_leave_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.seq");
        write_atomically(&path, b"41").unwrap();
        write_atomically(&path, b"42").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "42");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![OsString::from("store.seq")]);
    }

    #[test]
    fn write_atomically_mode_should_never_show_more_than_the_mode_allows() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(dir.path().join("config.toml.tmp"), b"stale").unwrap();
        write_atomically_mode(&path, b"secret", Some(0o600)).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read(&path).unwrap(), b"secret");
        assert!(!dir.path().join("config.toml.tmp").exists());
    }

    #[test]
    fn sync_should_notice_new_blobs_and_directory_entries() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("db"), b"log").unwrap();
        let sync = DiskSync::open(dir.path()).unwrap();
        assert!(
            sync.seen
                .lock()
                .unwrap()
                .store
                .contains(&OsString::from("db"))
        );
        std::fs::create_dir(dir.path().join("blobs")).unwrap();
        std::fs::write(dir.path().join("blobs").join("7"), b"blob").unwrap();
        sync.sync().unwrap();
        let seen = sync.seen.lock().unwrap();
        assert!(seen.blobs.contains(&OsString::from("7")));
        assert!(seen.store.contains(&OsString::from("blobs")));
    }
}
