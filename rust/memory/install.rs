//! Installing received pages into fresh memory without zeroing it first.
//!
//! The first write to a page of private anonymous memory makes the kernel allocate the page,
//! clear it, and then let the write copy over the zeros: a trap, 4 KiB of stores that are thrown
//! away, and the copy itself. A migration destination or an eager restore writes every page once,
//! so on an unwired segment that first touch costs about as much as receiving the data.
//!
//! `userfaultfd(2)`'s `UFFDIO_COPY` allocates the page, copies into it and maps it in one step,
//! for a whole run of pages per call, with no trap and no clearing. An [`Installer`] registers a
//! segment's mapping for missing-page faults while pages are being received into it, and
//! [`super::InstallGuard::install`] puts a run of pages in place with it. Pages already there (a later
//! round of a live migration) are refused by the kernel with `EEXIST` and copied over instead.
//!
//! Registering makes every other first touch of the range wait for a userfaultfd handler, so the
//! installer runs one: a thread that answers each such fault with a zero page (`UFFDIO_ZEROPAGE`),
//! which is what the touch would have seen without the registration. Whatever reads or writes
//! the memory meanwhile (a device, a numpy view, the digest) sees the same bytes as before, only a
//! little later. The registration ends when the last receiver lets go ([`Segment::begin_install`]
//! counts them), before the guest runs.
//!
//! Only private anonymous, unwired, eagerly mapped segments are installed into: a wired segment
//! is populated up front, a memfd's pages live in the file, and a lazily restored segment loads
//! its chunks its own way. Where the kernel refuses (no userfaultfd for this process, or the range
//! is already registered by the kernel dirty backend), the segment remembers why and its callers
//! write the pages as before.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::address::PAGE_SIZE;
use crate::uffd::{
    self, UffdMsg, UffdioCopy, UffdioRange, UffdioZeropage, UFFDIO_COPY, UFFDIO_REGISTER_MODE_MISSING, UFFDIO_WAKE, UFFDIO_ZEROPAGE,
    UFFD_EVENT_PAGEFAULT,
};

/// One segment's registration for missing-page faults, with the thread that answers faults no
/// installer call resolved. Dropping it unregisters the range (waking any fault still waiting,
/// which then proceeds as an ordinary first touch) and stops the thread.
pub struct Installer {
    uffd: Arc<OwnedFd>,
    start: u64,
    len: u64,
    stop: OwnedFd,
    handler: Option<JoinHandle<()>>,
    /// Faults the handler answered with a zero page.
    zero_filled: Arc<AtomicU64>,
}

impl Installer {
    /// Register `len` bytes at `base` (page-aligned, private anonymous) for missing-page faults
    /// and start the thread that answers them, or say why the kernel would not.
    pub(super) fn register(base: *mut u8, len: usize) -> Result<Installer, String> {
        let uffd = uffd::open()?;
        uffd::handshake(&uffd, 0).map_err(|e| format!("UFFDIO_API: {e}"))?;
        let (start, len) = (base as u64, len as u64);
        uffd::register(&uffd, start, len, UFFDIO_REGISTER_MODE_MISSING).map_err(|e| format!("UFFDIO_REGISTER: {e}"))?;
        // SAFETY: eventfd has no preconditions; it returns a new fd or -1.
        let stop = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        let uffd = Arc::new(uffd);
        if stop < 0 {
            let why = format!("eventfd: {}", std::io::Error::last_os_error());
            uffd::unregister(&uffd, start, len);
            return Err(why);
        }
        // SAFETY: a fresh fd that nothing else owns.
        let stop = unsafe { OwnedFd::from_raw_fd(stop) };
        let zero_filled = Arc::new(AtomicU64::new(0));
        let spawned = std::thread::Builder::new().name("vmm-install".into()).spawn({
            let (uffd, zero_filled, stop) = (uffd.clone(), zero_filled.clone(), stop.as_raw_fd());
            move || answer_faults(&uffd, stop, &zero_filled)
        });
        match spawned {
            Ok(handler) => Ok(Installer { uffd, start, len, stop, handler: Some(handler), zero_filled }),
            Err(e) => {
                uffd::unregister(&uffd, start, len);
                Err(format!("starting the fault handler thread: {e}"))
            }
        }
    }

    /// Faults answered with a zero page so far (touches of pages no installer call had put there).
    pub fn zero_filled(&self) -> u64 {
        self.zero_filled.load(Ordering::Relaxed)
    }

    /// Put `src` (whole pages) at `dst` inside the registered range. Pages already present are
    /// copied over, so the result is the same as a plain copy whatever was there. Returns how
    /// many pages were installed fresh (the rest were copied over).
    ///
    /// # Safety
    /// `dst..dst+src.len()` must lie inside the registered range, page-aligned, and nothing may
    /// hold a Rust reference into it.
    pub(super) unsafe fn install(&self, dst: *mut u8, src: &[u8]) -> usize {
        debug_assert!(src.len().is_multiple_of(PAGE_SIZE) && (dst as usize).is_multiple_of(PAGE_SIZE));
        debug_assert!(dst as u64 >= self.start && dst as u64 + src.len() as u64 <= self.start + self.len);
        let (mut done, mut fresh) = (0, 0);
        let mut present_in_a_row = 0;
        while done < src.len() {
            // After two present pages in a row the rest of the run is most likely present too (a
            // later round rewriting pages it sent before): copy it plainly. A page still missing
            // then is zero-filled by the handler and copied over, at the cost of one fault.
            if present_in_a_row >= 2 {
                // SAFETY: the caller's contract; the handler thread makes any missing page present.
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr().add(done), dst.add(done), src.len() - done) };
                return fresh / PAGE_SIZE;
            }
            let mut copy = UffdioCopy {
                dst: dst as u64 + done as u64,
                src: src.as_ptr() as u64 + done as u64,
                len: (src.len() - done) as u64,
                mode: 0,
                copy: 0,
            };
            // SAFETY: UFFDIO_COPY writes only the destination range, inside the registered range of
            // our own mapping (the caller's contract), reads `src`, and reports into `copy`.
            let rc = unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_COPY, &mut copy) };
            if rc == 0 {
                return (fresh + src.len() - done) / PAGE_SIZE;
            }
            let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            if copy.copy > 0 {
                done += copy.copy as usize;
                fresh += copy.copy as usize;
                present_in_a_row = 0;
                continue;
            }
            match errno {
                libc::EAGAIN | libc::EINTR => continue,
                _ => {
                    // EEXIST: this page is there already; any other refusal: copy it the plain way,
                    // which is always right (a missing page faults and is answered).
                    // SAFETY: as above.
                    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr().add(done), dst.add(done), PAGE_SIZE) };
                    done += PAGE_SIZE;
                    present_in_a_row += 1;
                }
            }
        }
        fresh / PAGE_SIZE
    }
}

impl Drop for Installer {
    fn drop(&mut self) {
        // Faults still waiting are woken and retried as ordinary first touches.
        uffd::unregister(&self.uffd, self.start, self.len);
        let one = 1u64.to_ne_bytes();
        // SAFETY: an 8-byte write to our eventfd wakes the handler's poll.
        unsafe { libc::write(self.stop.as_raw_fd(), one.as_ptr() as *const libc::c_void, one.len()) };
        if let Some(handler) = self.handler.take() {
            let _ = handler.join();
        }
    }
}

/// The handler thread: answer every missing-page fault with a zero page until `stop` is signalled.
fn answer_faults(uffd: &OwnedFd, stop: RawFd, zero_filled: &AtomicU64) {
    let mut fds = [
        libc::pollfd { fd: uffd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: stop, events: libc::POLLIN, revents: 0 },
    ];
    loop {
        // SAFETY: poll reads and writes the two pollfds we own.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return;
        }
        if fds[1].revents != 0 || fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            return;
        }
        loop {
            let mut msg = UffdMsg { event: 0, reserved: [0; 7], flags: 0, address: 0, rest: 0 };
            // SAFETY: reading one uffd_msg into a struct of its size and layout; the fd is non-blocking.
            let got =
                unsafe { libc::read(uffd.as_raw_fd(), &mut msg as *mut UffdMsg as *mut libc::c_void, std::mem::size_of::<UffdMsg>()) };
            if got != std::mem::size_of::<UffdMsg>() as isize {
                break;
            }
            if msg.event != UFFD_EVENT_PAGEFAULT {
                continue;
            }
            let page = msg.address & !(PAGE_SIZE as u64 - 1);
            let mut zero = UffdioZeropage { range: UffdioRange { start: page, len: PAGE_SIZE as u64 }, mode: 0, zeropage: 0 };
            // SAFETY: maps the zero page at a faulting page of the registered range (or fails with
            // EEXIST if an installer call got there first).
            let rc = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_ZEROPAGE, &mut zero) };
            if rc == 0 {
                zero_filled.fetch_add(1, Ordering::Relaxed);
            } else {
                let mut r = UffdioRange { start: page, len: PAGE_SIZE as u64 };
                // SAFETY: wakes whoever waits on that page; it is present now.
                unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_WAKE, &mut r) };
            }
        }
    }
}
