//! A peer that stops moving bytes: how batch I/O on a blocking socket waits for it and how it
//! reports giving up.
//!
//! Callers bound every socket send and receive with SO_SNDTIMEO / SO_RCVTIMEO; the kernel then
//! answers a stalled transfer with EAGAIN on a blocking fd, which is a timeout, not a
//! non-blocking fd. A blocking send gives the timeout away twice over: when it copies part of its
//! bytes and then waits, it returns that part only when the timeout expires, and the next call
//! waits the whole timeout again. So sends to a socket with a send timeout never sleep in the
//! kernel: they send what fits (MSG_DONTWAIT) and wait in poll() for room, the timeout counting
//! from the last byte the peer took ([`SendDeadline`]). Receives of page data sleep until a
//! whole window has arrived ([`WholeReads`]), the timeout counting from the last byte that came.
//!
//! What is reported is fact, not policy: which fd, the peer's address when it is a TCP socket,
//! the direction, and the timeout that ran out ([`PageError::TimedOut`]).

use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{FromRawFd, RawFd};
use std::time::{Duration, Instant};

use crate::digest::{Direction, PageError};

/// The socket's SO_SNDTIMEO or SO_RCVTIMEO, None when it has none (or `fd` is no socket).
pub(super) fn socket_timeout(fd: RawFd, direction: Direction) -> Option<Duration> {
    let opt = match direction {
        Direction::Send => libc::SO_SNDTIMEO,
        Direction::Receive => libc::SO_RCVTIMEO,
    };
    let mut tv = libc::timeval { tv_sec: 0, tv_usec: 0 };
    let mut len = std::mem::size_of::<libc::timeval>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into the timeval we own.
    if unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, opt, (&mut tv as *mut libc::timeval).cast(), &mut len) } != 0 {
        return None;
    }
    let timeout = Duration::new(tv.tv_sec.max(0) as u64, (tv.tv_usec.max(0) as u32) * 1000);
    (!timeout.is_zero()).then_some(timeout)
}

/// A duration as poll()'s milliseconds, rounded up (a timeout never ends early), at least 1.
pub(super) fn poll_ms(d: Duration) -> libc::c_int {
    (d.as_micros().div_ceil(1000)).clamp(1, libc::c_int::MAX as u128) as libc::c_int
}

fn is_nonblocking(fd: RawFd) -> bool {
    // SAFETY: F_GETFL only reads the descriptor's flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    flags >= 0 && flags & libc::O_NONBLOCK != 0
}

/// The TCP peer's address (`1.2.3.4:5`, `[::1]:5`), None for anything else.
fn peer_of(fd: RawFd) -> Option<String> {
    // SAFETY: the fd is the caller's and stays open for the call; ManuallyDrop never closes it.
    let stream = ManuallyDrop::new(unsafe { std::net::TcpStream::from_raw_fd(fd) });
    stream.peer_addr().ok().map(|a| a.to_string())
}

/// The error for EAGAIN from `fd`: a timeout when the fd is blocking (its SO_SNDTIMEO or
/// SO_RCVTIMEO ran out), a misuse when it is non-blocking.
pub(super) fn would_block(fd: RawFd, what: &str, direction: Direction) -> PageError {
    if is_nonblocking(fd) {
        return PageError::io(
            format!("{what}: fd {fd} is non-blocking and would block; page batches need a blocking fd (Python: sock.setblocking(True))"),
            io::Error::from_raw_os_error(libc::EAGAIN),
        );
    }
    timed_out(fd, what, direction, socket_timeout(fd, direction).unwrap_or_default())
}

pub(super) fn timed_out(fd: RawFd, what: &str, direction: Direction, timeout: Duration) -> PageError {
    PageError::TimedOut { what: what.to_string(), fd, direction, timeout, peer: peer_of(fd) }
}

/// Sends on a socket with a send timeout: each send takes what fits without sleeping, and
/// between them [`SendDeadline::wait`] sleeps in poll() until there is room, failing once the
/// peer has taken nothing for the whole timeout.
pub(super) struct SendDeadline {
    fd: RawFd,
    timeout: Duration,
    last_progress: Instant,
}

impl SendDeadline {
    /// For a blocking socket with SO_SNDTIMEO; None otherwise (plain blocking writes then).
    pub(super) fn new(fd: RawFd) -> Option<SendDeadline> {
        if is_nonblocking(fd) {
            return None;
        }
        socket_timeout(fd, Direction::Send).map(|timeout| SendDeadline { fd, timeout, last_progress: Instant::now() })
    }

    pub(super) fn progressed(&mut self) {
        self.last_progress = Instant::now();
    }

    /// Sleep until the socket takes bytes again (or fails, or is shut down: the next send says
    /// which). A [`PageError::TimedOut`] once the timeout has passed since the last progress.
    pub(super) fn wait(&mut self, what: &str) -> Result<(), PageError> {
        loop {
            let left = self.timeout.saturating_sub(self.last_progress.elapsed());
            if left.is_zero() {
                return Err(timed_out(self.fd, what, Direction::Send, self.timeout));
            }
            let mut pfd = libc::pollfd { fd: self.fd, events: libc::POLLOUT, revents: 0 };
            // SAFETY: one pollfd of ours.
            match unsafe { libc::poll(&mut pfd, 1, poll_ms(left)) } {
                0 => continue, // the loop above decides: the deadline has passed
                n if n < 0 => {
                    let err = io::Error::last_os_error();
                    if err.raw_os_error() != Some(libc::EINTR) {
                        return Err(PageError::io(format!("{what} (fd {})", self.fd), err));
                    }
                }
                _ => return Ok(()),
            }
        }
    }
}

/// Reads from a socket that sleep until everything asked for (up to the reader's window) has
/// arrived, instead of being woken for every segment.
///
/// Loopback TCP wakes a sleeping reader for each 64 KiB segment, and on a VM each wake-up of an
/// idle CPU costs the sender an IPI: a warm 1 GiB migration between two processes on 2 vCPUs took
/// 0.2 s in most runs and 0.5-0.7 s in about one of four, with the sender busy waking the
/// receiver. With SO_RCVLOWAT the kernel wakes the reader once the bytes it needs are queued.
///
/// SO_RCVLOWAT counts only bytes not yet read, so a read that copies part of what it needs and
/// then sleeps would wait for a whole low-water mark of *new* bytes, which may never come at the
/// end of a stream. So the reader never sleeps inside a read: it sets the mark to exactly what is
/// still missing, waits in poll() (woken when that much is queued, or on EOF, error, shutdown or
/// memory pressure, or at a quarter of the receive timeout when fewer bytes came) and then reads
/// without blocking, until the iovecs are full.
pub(super) struct WholeReads {
    fd: RawFd,
    /// The socket's SO_RCVTIMEO (None: it has none).
    timeout: Option<Duration>,
    lowat: libc::c_int,
    /// The most it asks to be woken for (SO_RCVLOWAT): the caller's window, so a read of a whole
    /// payload at once (no tracker, no meter) still wakes a window's worth at a time.
    most: usize,
}

/// How a [`WholeReads`] sleep ended.
pub(super) enum Woken {
    /// What was missing is queued, or bytes below the mark arrived, or the stream ended, failed
    /// or was shut down: read now.
    Ready,
    /// Nothing arrived for the socket's whole SO_RCVTIMEO.
    TimedOut(Duration),
}

impl WholeReads {
    /// For a socket (a plain one, or the one under a TLS session), None for anything else (a
    /// pipe, read without it), waking for at most `most` bytes at a time.
    pub(super) fn new(fd: RawFd, most: usize) -> Option<WholeReads> {
        let mut kind: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into the c_int we own; it fails for a non-socket.
        if unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_TYPE, (&mut kind as *mut libc::c_int).cast(), &mut len) } != 0 {
            return None;
        }
        Some(WholeReads { fd, timeout: socket_timeout(fd, Direction::Receive), lowat: 1, most: most.max(1) })
    }

    fn set_lowat(&mut self, bytes: usize) {
        let bytes = bytes.clamp(1, self.most) as libc::c_int;
        if bytes != self.lowat {
            // SAFETY: the option value is a c_int on our stack, passed with its size. A refusal
            // only means the reader is woken earlier (poll then returns sooner; nothing hangs).
            unsafe {
                libc::setsockopt(
                    self.fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVLOWAT,
                    (&bytes as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            self.lowat = bytes;
        }
    }

    /// Bytes queued on the socket, not yet read (FIONREAD).
    fn queued(&self) -> libc::c_int {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one c_int into ours.
        if unsafe { libc::ioctl(self.fd, libc::FIONREAD, &mut n) } != 0 {
            return 0;
        }
        n
    }

    /// Sleep until `missing` bytes (at most its window) are queued, or the stream ends,
    /// fails or is shut down. The socket's SO_RCVTIMEO without a byte arriving is a
    /// [`PageError::TimedOut`].
    pub(super) fn wait(&mut self, missing: usize, what: &str) -> Result<(), PageError> {
        match self.sleep(missing) {
            Ok(Woken::Ready) => Ok(()),
            Ok(Woken::TimedOut(timeout)) => Err(timed_out(self.fd, what, Direction::Receive, timeout)),
            Err(err) => Err(PageError::io(format!("{what} (fd {})", self.fd), err)),
        }
    }

    /// [`wait`](Self::wait), saying how it ended. The sleep looks at the queue every quarter
    /// timeout: bytes queued below the mark end it, so the reader takes them (a peer trickling,
    /// or one that stopped short of the mark, as a TLS alert does) and the timeout counts from
    /// (at most a quarter after) the last byte that arrived. A signal does not end it, nor move
    /// its deadline.
    pub(super) fn sleep(&mut self, missing: usize) -> io::Result<Woken> {
        self.set_lowat(missing);
        let since = Instant::now();
        loop {
            let ms = self.timeout.map_or(-1, |t| poll_ms((t / 4).min(t.saturating_sub(since.elapsed()))));
            let mut pfd = libc::pollfd { fd: self.fd, events: libc::POLLIN, revents: 0 };
            // SAFETY: one pollfd of ours.
            match unsafe { libc::poll(&mut pfd, 1, ms) } {
                0 => {
                    let timeout = self.timeout.unwrap_or_default();
                    if self.queued() > 0 {
                        return Ok(Woken::Ready);
                    } else if since.elapsed() >= timeout {
                        return Ok(Woken::TimedOut(timeout));
                    }
                }
                n if n < 0 => {
                    let err = io::Error::last_os_error();
                    if err.raw_os_error() != Some(libc::EINTR) {
                        return Err(err);
                    }
                }
                _ => return Ok(Woken::Ready),
            }
        }
    }
}

impl Drop for WholeReads {
    /// Back to the default mark for whatever reads the socket next (the frames after a batch).
    fn drop(&mut self) {
        self.set_lowat(1);
    }
}
