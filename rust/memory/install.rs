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

// From <linux/userfaultfd.h>: the ioctls are _IOWR(0xAA, nr, struct).
const UFFD_API: u64 = 0xAA;
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_aa01;
const UFFDIO_WAKE: libc::c_ulong = 0x8010_aa02;
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xc020_aa04;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xaa00;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg`: 32 bytes; for a page fault, `arg.pagefault.address` is at offset 16.
#[repr(C)]
struct UffdMsg {
    event: u8,
    _reserved: [u8; 7],
    flags: u64,
    address: u64,
    _rest: u64,
}

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

fn last_error(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn open_userfaultfd() -> Result<OwnedFd, String> {
    // The syscall needs CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1; /dev/userfaultfd (Linux
    // 6.1+) works for whoever may open it.
    // SAFETY: the userfaultfd syscall takes flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd >= 0 {
        // SAFETY: a fresh fd that nothing else owns.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
    }
    let sys = last_error("userfaultfd(2)");
    let dev =
        std::fs::OpenOptions::new().read(true).write(true).open("/dev/userfaultfd").map_err(|e| format!("{sys}; /dev/userfaultfd: {e}"))?;
    // SAFETY: USERFAULTFD_IOC_NEW takes the new fd's flags and returns a new fd.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(format!("{sys}; {}", last_error("USERFAULTFD_IOC_NEW")));
    }
    // SAFETY: the ioctl returned a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Installer {
    /// Register `len` bytes at `base` (page-aligned, private anonymous) for missing-page faults
    /// and start the thread that answers them, or say why the kernel would not.
    pub(super) fn register(base: *mut u8, len: usize) -> Result<Installer, String> {
        let uffd = open_userfaultfd()?;
        let mut api = UffdioApi { api: UFFD_API, features: 0, ioctls: 0 };
        // SAFETY: UFFDIO_API reads and writes the struct we pass, on a userfaultfd we own.
        if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API, &mut api) } != 0 {
            return Err(last_error("UFFDIO_API"));
        }
        let range = UffdioRange { start: base as u64, len: len as u64 };
        let mut reg = UffdioRegister { range, mode: UFFDIO_REGISTER_MODE_MISSING, ioctls: 0 };
        // SAFETY: registering a range of our own mapping on our userfaultfd.
        if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) } != 0 {
            return Err(last_error("UFFDIO_REGISTER"));
        }
        // SAFETY: eventfd has no preconditions; it returns a new fd or -1.
        let stop = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        let uffd = Arc::new(uffd);
        let unregister = |uffd: &OwnedFd| {
            let mut r = range;
            // SAFETY: unregistering the range registered above.
            unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_UNREGISTER, &mut r) };
        };
        if stop < 0 {
            let why = last_error("eventfd");
            unregister(&uffd);
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
            Ok(handler) => Ok(Installer { uffd, start: range.start, len: range.len, stop, handler: Some(handler), zero_filled }),
            Err(e) => {
                unregister(&uffd);
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
        debug_assert!(src.len() % PAGE_SIZE == 0 && dst as usize % PAGE_SIZE == 0);
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
        let mut r = UffdioRange { start: self.start, len: self.len };
        // SAFETY: unregistering our own registration; faults still waiting are woken and retried
        // as ordinary first touches.
        unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_UNREGISTER, &mut r) };
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
            let mut msg = UffdMsg { event: 0, _reserved: [0; 7], flags: 0, address: 0, _rest: 0 };
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
