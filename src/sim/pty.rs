//! A simulated device on a pseudo-terminal, served on a thread of its own: the IEC 62056-21
//! and DLMS simulators' serial side. The agent opens the slave end by its path, as it opens
//! a USB converter's.

use std::future::Future;
use std::path::{Path, PathBuf};

/// How to read the rate the agent set on the slave end of a pty.
pub type PeerBaud = Box<dyn Fn() -> Option<u32> + Send>;

/// A simulated device on a pseudo-terminal, served on a thread of its own: a meter is a
/// device of its own and does not share the agent's scheduler (sharing a multi-threaded
/// runtime with the agent made the tests' timing depend on how tokio placed the two sides).
/// Stops when dropped.
pub struct SimPty {
    path: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl SimPty {
    /// The slave side, for the agent to open as its serial device.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SimPty {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Opens a pseudo-terminal pair and runs `serve` on its master end, on a thread named
/// `name` with a runtime of its own, until the [`SimPty`] is dropped.
pub fn spawn<F, Fut>(name: &str, serve: F) -> std::io::Result<SimPty>
where
    F: FnOnce(tokio_serial::SerialStream, PeerBaud) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let (path_tx, path_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = path_tx.send(Err(e));
                    return;
                }
            };
            rt.block_on(async move {
                match open_pty() {
                    Ok((master, path, peer)) => {
                        let _ = path_tx.send(Ok(path));
                        tokio::select! {
                            () = serve(master, peer) => {}
                            _ = stop_rx => {}
                        }
                    }
                    Err(e) => {
                        let _ = path_tx.send(Err(e));
                    }
                }
            });
        })?;
    let path = path_rx.recv().map_err(|_| {
        std::io::Error::other("the simulator thread ended before opening its pty")
    })??;
    Ok(SimPty {
        path,
        stop: Some(stop_tx),
    })
}

/// The master end, the slave's path, and how to read the slave's rate.
fn open_pty() -> std::io::Result<(tokio_serial::SerialStream, PathBuf, PeerBaud)> {
    use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
    use tokio_serial::SerialPort;
    let (master, slave) = tokio_serial::SerialStream::pair().map_err(std::io::Error::from)?;
    let path = slave
        .name()
        .map(PathBuf::from)
        .ok_or_else(|| std::io::Error::other("the pty slave has no name"))?;
    // The agent opens the slave by its path. Keeping this handle open would keep the agent's
    // exclusive lock (TIOCEXCL) on the tty alive across its reopenings.
    drop(slave);
    // SAFETY: the descriptor belongs to `master`, open for this call; the clone is owned.
    let termios_fd: OwnedFd =
        unsafe { BorrowedFd::borrow_raw(master.as_raw_fd()) }.try_clone_to_owned()?;
    Ok((master, path, Box::new(move || pty_baud(&termios_fd))))
}

/// The rate the other side of a pty has set (Linux shares one termios per pair). The serial
/// crate sets rates with `termios2` (`BOTHER`), so the number is read from there.
#[cfg(target_os = "linux")]
fn pty_baud(fd: &std::os::fd::OwnedFd) -> Option<u32> {
    use std::os::fd::AsRawFd;
    let mut t = std::mem::MaybeUninit::<libc::termios2>::uninit();
    // SAFETY: `fd` is open; TCGETS2 fills `t` when it returns 0.
    let t = unsafe {
        if libc::ioctl(fd.as_raw_fd(), libc::TCGETS2 as _, t.as_mut_ptr()) != 0 {
            return None;
        }
        t.assume_init()
    };
    Some(t.c_ospeed)
}

#[cfg(not(target_os = "linux"))]
fn pty_baud(_: &std::os::fd::OwnedFd) -> Option<u32> {
    None
}
