//! Terminals: a session's PTY (the agent's master side, read and written without blocking)
//! and window sizes.

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::pty::Winsize;
use nix::sys::termios::{tcgetattr, LocalFlags};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use tokio::io::unix::AsyncFd;

/// The agent's side of a session's terminal.
pub struct PtyMaster {
    fd: AsyncFd<OwnedFd>,
}

/// A new PTY of `cols` x `rows`: the master side, and the slave side for the session.
pub fn open_pty(cols: u16, rows: u16) -> io::Result<(PtyMaster, OwnedFd)> {
    let pair = nix::pty::openpty(Some(&winsize(cols, rows)), None)?;
    let flags = OFlag::from_bits_truncate(fcntl(pair.master.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(
        pair.master.as_raw_fd(),
        FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK),
    )?;
    let fd = super::async_fd::register(pair.master)?;
    Ok((PtyMaster { fd }, pair.slave))
}

fn winsize(cols: u16, rows: u16) -> Winsize {
    Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

impl PtyMaster {
    /// Reads what the session wrote; `Ok(0)` once every slave descriptor is closed.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            // A would-block error (EAGAIN) must reach `try_io` as one, to clear readiness.
            match guard.try_io(|fd| nix::unistd::read(fd.as_raw_fd(), buf).map_err(io::Error::from))
            {
                Ok(Ok(n)) => return Ok(n),
                // EIO is how Linux says the slave side is closed.
                Ok(Err(e)) if e.raw_os_error() == Some(Errno::EIO as i32) => return Ok(0),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from))
            {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    pub fn resize(&self, cols: u16, rows: u16) -> io::Result<()> {
        set_window_size(self.fd.get_ref().as_fd(), cols, rows)
    }

    /// The terminal's local modes (canonical input, echo, ...) as the session set them.
    pub fn local_flags(&self) -> nix::Result<LocalFlags> {
        tcgetattr(self.fd.get_ref().as_fd()).map(|t| t.local_flags)
    }
}

fn set_window_size(fd: BorrowedFd<'_>, cols: u16, rows: u16) -> io::Result<()> {
    let size = winsize(cols, rows);
    // SAFETY: TIOCSWINSZ reads one winsize, here a valid one that outlives the call; `fd`
    // is open for the call (borrowed). nix has only unsafe ioctl wrappers.
    if unsafe { nix::libc::ioctl(fd.as_raw_fd(), nix::libc::TIOCSWINSZ, &size) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The window size (columns, rows) of the terminal behind `fd`; an error if it is not a
/// terminal.
pub fn window_size(fd: BorrowedFd<'_>) -> io::Result<(u16, u16)> {
    let mut size = winsize(0, 0);
    // SAFETY: TIOCGWINSZ writes one winsize, into `size`, which is valid and ours for the
    // call; `fd` is open for the call (borrowed). nix has only unsafe ioctl wrappers.
    if unsafe { nix::libc::ioctl(fd.as_raw_fd(), nix::libc::TIOCGWINSZ, &mut size) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((size.ws_col, size.ws_row))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A read after the session went quiet waits for more, and ends once the slave side
    /// is closed.
    #[tokio::test]
    async fn reads_wait_for_the_session_and_end_with_it() {
        let (master, slave) = open_pty(80, 24).unwrap();
        let mut buf = [0u8; 64];
        nix::unistd::write(&slave, b"a").unwrap();
        assert_eq!(master.read(&mut buf).await.unwrap(), 1);
        let later = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            nix::unistd::write(&slave, b"b").unwrap();
            slave
        };
        let (read, slave) = tokio::join!(master.read(&mut buf), later);
        assert_eq!(read.unwrap(), 1);
        assert_eq!(buf[0], b'b');
        drop(slave);
        assert_eq!(master.read(&mut buf).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_resize_is_what_the_terminal_reports() {
        let (master, slave) = open_pty(80, 24).unwrap();
        assert_eq!(window_size(slave.as_fd()).unwrap(), (80, 24));
        master.resize(100, 40).unwrap();
        assert_eq!(window_size(slave.as_fd()).unwrap(), (100, 40));
        assert!(window_size(std::fs::File::open("/dev/null").unwrap().as_fd()).is_err());
    }
}
