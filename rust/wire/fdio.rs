//! Moving bytes over a blocking file descriptor for batch I/O: write or fill a list of iovecs,
//! with a socket's send and receive timeouts honoured as `stall` explains, and socket reads that
//! wait for whole windows ([`WholeReads`]). A [`Link`] is where batches go: a plain fd, or a
//! socket whose TLS session ends in the core (`tls`), whose bytes are en- and decrypted on the
//! way. Nothing here knows what the bytes are.

use std::io;
use std::os::fd::RawFd;

use super::stall::{would_block, SendDeadline, WholeReads};
use super::tls::TlsStream;
use crate::digest::{Direction, PageError};

/// At most this many iovecs per call (Linux's UIO_MAXIOV).
const IOV_MAX: usize = 1024;

/// With a digest tracker, a sender writes and hashes page bytes this much at a time (512 KiB):
/// small enough to stay in a core's L2 cache (1 MiB on the EPYC this was measured on) between the
/// copy to the socket and the hash, so the hash reads the cache instead of memory; large enough
/// that the syscalls and loopback wake-ups per GiB stay few. Warm 1 GiB wired, 7 alternated
/// sets of 5 a side, when the hash came first: 256 KiB windows 3.12-3.77 GiB/s (one set 2.30),
/// 512 KiB 3.54-3.81, and 1 MiB 3.42-3.69 in 3 sets (session 19). A receiver reads and hashes
/// `RECV_WINDOW_PAGES` at a time.
pub(super) const HASH_WINDOW_PAGES: usize = 128;

/// Where page batches are written to or read from: a blocking fd the caller owns and keeps open
/// for the call, or a socket's TLS session (`tls`), which the caller keeps alive likewise.
#[derive(Clone, Copy, Debug)]
pub enum Link<'a> {
    Fd(RawFd),
    Tls(&'a TlsStream),
}

impl Link<'_> {
    /// The fd the bytes move through: the socket under a TLS session.
    pub(super) fn fd(self) -> RawFd {
        match self {
            Link::Fd(fd) => fd,
            Link::Tls(tls) => tls.fd(),
        }
    }
}

impl From<RawFd> for Link<'_> {
    fn from(fd: RawFd) -> Self {
        Link::Fd(fd)
    }
}

impl<'a> From<&'a TlsStream> for Link<'a> {
    fn from(tls: &'a TlsStream) -> Self {
        Link::Tls(tls)
    }
}

/// Drop the first `n` bytes from `iovs[*idx..]`.
fn advance(iovs: &mut [libc::iovec], idx: &mut usize, mut n: usize) {
    while n > 0 && *idx < iovs.len() {
        let iov = &mut iovs[*idx];
        if n >= iov.iov_len {
            n -= iov.iov_len;
            *idx += 1;
        } else {
            iov.iov_base = (iov.iov_base as *mut u8).wrapping_add(n) as *mut libc::c_void;
            iov.iov_len -= n;
            n = 0;
        }
    }
    while *idx < iovs.len() && iovs[*idx].iov_len == 0 {
        *idx += 1;
    }
}

/// Write every byte the iovecs describe. Sockets get sendmsg(MSG_NOSIGNAL), so a closed peer is
/// an EPIPE error rather than a SIGPIPE; anything else (pipe, file) gets writev. A socket with a
/// send timeout is written without sleeping in the kernel, waiting for room in poll(), so the
/// timeout counts from the last byte the peer took ([`SendDeadline`]).
///
/// # Safety
/// Every iovec must describe memory readable for the whole call.
pub(super) unsafe fn write_all(link: Link<'_>, iovs: &mut [libc::iovec], what: &str) -> Result<(), PageError> {
    // SAFETY: the caller's contract, passed on.
    unsafe { write_all_more(link, iovs, what, false) }
}

/// [`write_all`]; with `more`, the caller's next write follows at once (the next window of one
/// page batch), which a TLS link uses to fill its records and write them in larger runs
/// (`TlsStream::send_parts_more`). The last write of a run must be without `more`. A plain fd
/// writes everything now either way.
///
/// # Safety
/// Every iovec must describe memory readable for the whole call.
pub(super) unsafe fn write_all_more(link: Link<'_>, iovs: &mut [libc::iovec], what: &str, more: bool) -> Result<(), PageError> {
    let fd = match link {
        Link::Fd(fd) => fd,
        // SAFETY: the caller's contract, passed on.
        Link::Tls(tls) => return unsafe { tls.send_iovecs(iovs, what, more) },
    };
    let mut idx = 0;
    advance(iovs, &mut idx, 0);
    let mut socket = true;
    let mut deadline = SendDeadline::new(fd);
    while idx < iovs.len() {
        let count = (iovs.len() - idx).min(IOV_MAX);
        let n = if socket {
            // SAFETY: an all-zero msghdr is valid (no name, no control data).
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iovs[idx..].as_mut_ptr();
            msg.msg_iovlen = count as _;
            let flags = libc::MSG_NOSIGNAL | if deadline.is_some() { libc::MSG_DONTWAIT } else { 0 };
            // SAFETY: the iovecs describe readable memory (the caller's contract); the kernel only reads them.
            unsafe { libc::sendmsg(fd, &msg, flags) }
        } else {
            // SAFETY: as above.
            unsafe { libc::writev(fd, iovs[idx..].as_ptr(), count as libc::c_int) }
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ENOTSOCK) if socket => {
                    socket = false;
                    deadline = None;
                    continue;
                }
                Some(libc::EAGAIN) => match deadline.as_mut() {
                    Some(d) => {
                        d.wait(what)?;
                        continue;
                    }
                    None => return Err(would_block(fd, what, Direction::Send)),
                },
                _ => return Err(PageError::io(format!("{what} (fd {fd})"), err)),
            }
        }
        if n == 0 {
            return Err(PageError::io(format!("{what} (fd {fd})"), io::Error::from(io::ErrorKind::WriteZero)));
        }
        if let Some(d) = deadline.as_mut() {
            d.progressed();
        }
        advance(iovs, &mut idx, n as usize);
    }
    Ok(())
}

/// Fill every byte the iovecs describe from `fd`; returns how many bytes arrived before the
/// stream ended (the total when it did not).
///
/// # Safety
/// Every iovec must describe memory writable for the whole call and not referenced as `&`/`&mut`.
pub(super) unsafe fn read_all(link: Link<'_>, iovs: &mut [libc::iovec], what: &str) -> Result<u64, PageError> {
    // SAFETY: the caller's contract.
    unsafe { read_all_with(link, iovs, what, None) }
}

/// [`read_all`], with readv; or with `whole`, a poll for everything still missing and then a
/// non-blocking recvmsg, until the iovecs are full (see [`WholeReads`]).
///
/// # Safety
/// As for [`read_all`].
pub(super) unsafe fn read_all_with(
    link: Link<'_>,
    iovs: &mut [libc::iovec],
    what: &str,
    mut whole: Option<&mut WholeReads>,
) -> Result<u64, PageError> {
    let fd = match link {
        Link::Fd(fd) => fd,
        // SAFETY: the caller's contract, passed on.
        Link::Tls(tls) => return unsafe { tls.recv_iovecs(iovs, what, whole) },
    };
    let mut idx = 0;
    let mut got = 0u64;
    advance(iovs, &mut idx, 0);
    while idx < iovs.len() {
        let count = (iovs.len() - idx).min(IOV_MAX);
        let n = match whole.as_deref_mut() {
            None => {
                // SAFETY: the iovecs describe writable memory (the caller's contract).
                unsafe { libc::readv(fd, iovs[idx..].as_ptr(), count as libc::c_int) }
            }
            Some(w) => {
                w.wait(iovs[idx..].iter().map(|v| v.iov_len).sum(), what)?;
                // SAFETY: an all-zero msghdr is valid (no name, no control data).
                let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
                msg.msg_iov = iovs[idx..].as_mut_ptr();
                msg.msg_iovlen = count as _;
                // SAFETY: as for readv.
                unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) }
            }
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) if whole.is_some() => continue, // woken early: wait again
                Some(libc::EAGAIN) => return Err(would_block(fd, what, Direction::Receive)),
                _ => return Err(PageError::io(format!("{what} (fd {fd})"), err)),
            }
        }
        if n == 0 {
            break;
        }
        got += n as u64;
        advance(iovs, &mut idx, n as usize);
    }
    Ok(got)
}

pub(super) fn read_exact(link: Link<'_>, buf: &mut [u8], what: &'static str) -> Result<(), PageError> {
    let mut iov = [libc::iovec { iov_base: buf.as_mut_ptr() as *mut libc::c_void, iov_len: buf.len() }];
    // SAFETY: the iovec describes `buf`, which we borrow mutably for the call.
    let got = unsafe { read_all(link, &mut iov, &format!("receiving the {what}"))? };
    if got < buf.len() as u64 {
        return Err(PageError::Truncated { what, expected: buf.len() as u64, got });
    }
    Ok(())
}

/// A receiver with a digest tracker reads and hashes page bytes this much at a time (1 MiB: it
/// hashes what it just received, still in its L2 cache). Larger than the sender's hash window:
/// each read of a socket wakes the reader once, and every wake-up costs the sender an IPI and
/// the loopback delivery's work. A/B, warm 1 GiB into a wired destination, 256 KiB against
/// 1 MiB: 2.49-2.51 against 3.58-3.75 GiB/s, 0.58 against 0.43-0.44 CPU-s (session 18).
pub(super) const RECV_WINDOW_PAGES: usize = 256;

/// The receive window of one of a round's several streams (2 MiB). There the other streams keep
/// the CPUs busy while one waits, so each waits for more and wakes half as often. A lone stream
/// keeps 1 MiB: with 2 MiB its reader and the sender took turns idling. A/B, warm 1 GiB into a
/// wired destination, 4 alternated sets of 5 a side (medians of each set): `--streams 2`
/// 3.90-4.06 against 4.12-4.23 GiB/s, `--streams 4` 3.49-4.18 against 3.90-4.31; one stream
/// 3.71 and 4.23 against 3.08 and 2.44 (session 20).
pub(super) const SHARED_RECV_WINDOW_PAGES: usize = 512;
