//! The kernel-assisted dirty backend: userfaultfd write-protect in asynchronous mode, harvested
//! with the PAGEMAP_SCAN ioctl on /proc/self/pagemap (Linux 6.7+).
//!
//! Registration write-protects the guest's mappings; with `UFFD_FEATURE_WP_ASYNC` the kernel
//! resolves a write to a protected page itself (no message, no handler thread) and the page's PTE
//! loses its protection; with `UFFD_FEATURE_WP_UNPOPULATED` never-touched pages count as protected.
//! A harvest asks PAGEMAP_SCAN for pages that are "written" (not protected) and, in the same call,
//! protects them again: the kernel's get-and-clear, like reading and clearing an EPT dirty bit.
//!
//! The 6.1 headers and libc 0.2 lack these definitions, so they are written out here (values for
//! x86_64 and aarch64, which share the generic ioctl encoding).

use std::fmt;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use super::{AtomicBitmap, Backend, DirtyLog, DirtyLogError};
use crate::uffd::{self, UFFDIO_REGISTER_MODE_WP, UFFD_FEATURE_WP_ASYNC, UFFD_FEATURE_WP_UNPOPULATED};

const PAGEMAP_SCAN: libc::c_ulong = 0xC060_6610;
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
const PAGE_IS_WRITTEN: u64 = 1 << 1;

#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// Why the kernel backend cannot be used, in words a user can act on.
#[derive(Debug, Clone)]
pub struct KernelTrackerError(pub String);

impl fmt::Display for KernelTrackerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn last_os_error(what: &str) -> KernelTrackerError {
    KernelTrackerError(format!("{what}: {}", std::io::Error::last_os_error()))
}

/// One userfaultfd, with the ranges registered on it, and /proc/self/pagemap for scans.
pub struct KernelTracker {
    uffd: OwnedFd,
    pagemap: File,
}

const SCAN_REGIONS: usize = 512;

impl KernelTracker {
    /// Open a userfaultfd with asynchronous write-protect, or say why it cannot be had.
    pub fn open() -> Result<KernelTracker, KernelTrackerError> {
        let uffd = uffd::open().map_err(KernelTrackerError)?;
        if let Err(e) = uffd::handshake(&uffd, UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED) {
            return Err(KernelTrackerError(format!(
                "the kernel's userfaultfd lacks asynchronous write-protect (UFFD_FEATURE_WP_ASYNC, Linux 6.7+): {e}"
            )));
        }
        let pagemap = File::open("/proc/self/pagemap").map_err(|e| KernelTrackerError(format!("cannot open /proc/self/pagemap: {e}")))?;
        let tracker = KernelTracker { uffd, pagemap };
        tracker.probe_pagemap_scan()?;
        Ok(tracker)
    }

    /// PAGEMAP_SCAN arrived with WP_ASYNC, but check it on a page of our own before relying on it.
    fn probe_pagemap_scan(&self) -> Result<(), KernelTrackerError> {
        let len = 4096 * 4;
        // SAFETY: a private anonymous scratch mapping, unmapped below.
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        };
        if ptr == libc::MAP_FAILED {
            return Err(last_os_error("mmap for the PAGEMAP_SCAN probe"));
        }
        let result = (|| {
            self.register(ptr as *mut u8, len)?;
            // SAFETY: writing one byte into the scratch mapping.
            unsafe { *(ptr as *mut u8).add(4096) = 1 };
            let mut pages = Vec::new();
            self.harvest(ptr as *mut u8, len, |first, count| pages.push((first, count)))?;
            let mut again = Vec::new();
            self.harvest(ptr as *mut u8, len, |first, count| again.push((first, count)))?;
            if pages != vec![(1, 1)] || !again.is_empty() {
                return Err(KernelTrackerError(format!(
                    "PAGEMAP_SCAN did not report exactly the written page (got {pages:?}, then {again:?})"
                )));
            }
            self.unregister(ptr as *mut u8, len);
            Ok(())
        })();
        // SAFETY: unmapping the scratch mapping created above.
        unsafe { libc::munmap(ptr, len) };
        result
    }

    /// Write-protect `base..base+len` and start tracking writes to it. Pages already populated
    /// (wired memory) are protected now; unpopulated pages count as protected by themselves.
    pub fn register(&self, base: *mut u8, len: usize) -> Result<(), KernelTrackerError> {
        if let Err(e) = uffd::register(&self.uffd, base as u64, len as u64, UFFDIO_REGISTER_MODE_WP) {
            return Err(KernelTrackerError(format!("UFFDIO_REGISTER (write-protect mode): {e}")));
        }
        self.protect(base, len)
    }

    /// Protect a range again without reporting it: after restore or receive wrote pages that must
    /// not count as guest writes. Only for a guest that is not running (a concurrent write to the
    /// range could be forgotten).
    pub fn protect(&self, base: *mut u8, len: usize) -> Result<(), KernelTrackerError> {
        // A PAGEMAP_SCAN that matches written pages and re-protects them, throwing the list
        // away, costs only the written pages; UFFDIO_WRITEPROTECT would walk the whole range.
        self.harvest(base, len, |_, _| {})
    }

    pub fn unregister(&self, base: *mut u8, len: usize) {
        uffd::unregister(&self.uffd, base as u64, len as u64);
    }

    /// Report the written pages of `base..base+len` as (first page index, count) runs relative to
    /// `base`, and write-protect them again, atomically per page.
    pub fn harvest(&self, base: *mut u8, len: usize, sink: impl FnMut(u64, u64)) -> Result<(), KernelTrackerError> {
        self.scan(base, len, PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC, sink)
    }

    /// Report the written pages without protecting them again.
    pub fn peek(&self, base: *mut u8, len: usize, sink: impl FnMut(u64, u64)) -> Result<(), KernelTrackerError> {
        self.scan(base, len, 0, sink)
    }

    fn scan(&self, base: *mut u8, len: usize, flags: u64, mut sink: impl FnMut(u64, u64)) -> Result<(), KernelTrackerError> {
        let mut regions = [PageRegion::default(); SCAN_REGIONS];
        let end = base as u64 + len as u64;
        let mut start = base as u64;
        while start < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags,
                start,
                end,
                walk_end: 0,
                vec: regions.as_mut_ptr() as u64,
                vec_len: SCAN_REGIONS as u64,
                max_pages: 0,
                category_inverted: 0,
                category_mask: PAGE_IS_WRITTEN,
                category_anyof_mask: 0,
                return_mask: PAGE_IS_WRITTEN,
            };
            // SAFETY: PAGEMAP_SCAN reads `arg` and writes at most vec_len regions into `regions`.
            let n = unsafe { libc::ioctl(self.pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg) };
            if n < 0 {
                return Err(last_os_error("PAGEMAP_SCAN"));
            }
            for region in &regions[..n as usize] {
                let first = (region.start - base as u64) / 4096;
                sink(first, (region.end - region.start) / 4096);
            }
            // The kernel may stop early (its result vector is full); go on from where it stopped.
            if arg.walk_end <= start {
                break;
            }
            start = arg.walk_end;
        }
        Ok(())
    }
}

/// The `kernel` backend's log of one range (a segment): what the kernel saw written, OR'ed with a
/// soft bitmap of the marks. One [`KernelTracker`] (one userfaultfd) serves every range of a guest.
pub struct KernelLog {
    soft: AtomicBitmap,
    tracker: Arc<KernelTracker>,
    /// The range's address, kept as a number: the log never dereferences it, only hands it to
    /// the kernel, which checks it.
    base: usize,
    len: usize,
}

impl KernelLog {
    /// Register `base..base+len` (page-aligned, a mapping of ours that outlives the log) on
    /// `tracker` and start logging it.
    pub fn register(tracker: Arc<KernelTracker>, base: *mut u8, len: usize) -> Result<KernelLog, KernelTrackerError> {
        tracker.register(base, len)?;
        Ok(KernelLog { soft: AtomicBitmap::new(len / 4096), tracker, base: base as usize, len })
    }

    fn failed(e: KernelTrackerError) -> DirtyLogError {
        DirtyLogError { backend: Backend::Kernel, why: e.0 }
    }

    fn set_runs(words: &mut [u64]) -> impl FnMut(u64, u64) + '_ {
        |first, count| {
            for page in first..first + count {
                words[(page / 64) as usize] |= 1 << (page % 64);
            }
        }
    }
}

impl DirtyLog for KernelLog {
    fn backend(&self) -> Backend {
        Backend::Kernel
    }

    fn pages(&self) -> usize {
        self.soft.pages()
    }

    #[inline]
    fn mark(&self, first: usize, end: usize) {
        self.soft.set_range(first, end);
    }

    #[inline]
    fn mark_page(&self, page: usize) {
        self.soft.set(page);
    }

    fn get_and_clear(&self, words: &mut [u64]) -> Result<usize, DirtyLogError> {
        self.soft.get_and_clear_into(words);
        self.tracker.harvest(self.base as *mut u8, self.len, Self::set_runs(words)).map_err(Self::failed)?;
        Ok(words.iter().map(|w| w.count_ones() as usize).sum())
    }

    fn peek(&self, words: &mut [u64]) -> Result<(), DirtyLogError> {
        self.soft.peek_into(words);
        self.tracker.peek(self.base as *mut u8, self.len, Self::set_runs(words)).map_err(Self::failed)
    }

    fn forget_unmarked(&self, first: usize, end: usize) -> Result<(), DirtyLogError> {
        assert!(first <= end && end <= self.pages(), "pages {first}..{end} of a {}-page log", self.pages());
        // Plain address arithmetic inside the registered range; the kernel dereferences nothing
        // outside it.
        self.tracker.protect((self.base + first * 4096) as *mut u8, (end - first) * 4096).map_err(Self::failed)
    }
}

#[cfg(test)]
const PAGE_IS_PRESENT: u64 = 1 << 3;

#[cfg(test)]
/// For tests: whether this kernel offers what the tracker needs (Linux 6.7+, a userfaultfd that takes
/// asynchronous write-protect, PAGEMAP_SCAN), asked of the kernel directly: never through
/// `KernelTracker::open`, whose self-check would turn a broken tracker into a skip.
pub(crate) fn kernel_offers_tracking() -> Result<(), String> {
    // SAFETY: uname fills the zeroed struct we pass; release is NUL-terminated.
    let release = unsafe {
        let mut uts: libc::utsname = std::mem::zeroed();
        libc::uname(&mut uts);
        std::ffi::CStr::from_ptr(uts.release.as_ptr()).to_string_lossy().into_owned()
    };
    let mut numbers = release.split(|c: char| !c.is_ascii_digit()).map(|n| n.parse::<u32>().unwrap_or(0));
    if (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0)) < (6, 7) {
        return Err(format!("Linux {release} is older than 6.7"));
    }
    let uffd = uffd::open()?;
    uffd::handshake(&uffd, UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED).map_err(|e| format!("UFFDIO_API with WP_ASYNC: {e}"))?;
    let pagemap = File::open("/proc/self/pagemap").map_err(|e| e.to_string())?;
    let mut region = PageRegion::default();
    let mut arg = PmScanArg {
        size: std::mem::size_of::<PmScanArg>() as u64,
        flags: 0,
        start: 0,
        end: 4096,
        walk_end: 0,
        vec: &mut region as *mut PageRegion as u64,
        vec_len: 1,
        max_pages: 0,
        category_inverted: 0,
        category_mask: PAGE_IS_PRESENT,
        category_anyof_mask: 0,
        return_mask: PAGE_IS_PRESENT,
    };
    // SAFETY: a read-only scan of page 0 (never mapped) into one region we own.
    if unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg) } < 0 {
        return Err(format!("PAGEMAP_SCAN: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_writes_through_raw_pointers_where_available() {
        if let Err(why) = kernel_offers_tracking() {
            eprintln!("skipping: the kernel does not offer it: {why}");
            return;
        }
        let tracker = KernelTracker::open().expect("the kernel offers userfaultfd WP_ASYNC and PAGEMAP_SCAN, yet the tracker fails");
        let len = 4096 * 256;
        // SAFETY: a scratch mapping for the test, unmapped at the end.
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        } as *mut u8;
        tracker.register(ptr, len).unwrap();
        for page in [3usize, 4, 5, 100, 255] {
            // SAFETY: inside the scratch mapping.
            unsafe { *ptr.add(page * 4096 + 17) = 7 };
        }
        let mut runs = Vec::new();
        tracker.harvest(ptr, len, |f, c| runs.push((f, c))).unwrap();
        assert_eq!(runs, vec![(3, 3), (100, 1), (255, 1)]);
        let mut again = Vec::new();
        tracker.harvest(ptr, len, |f, c| again.push((f, c))).unwrap();
        assert!(again.is_empty(), "a second harvest with no writes must be empty: {again:?}");
        tracker.unregister(ptr, len);
        // SAFETY: unmapping the scratch mapping.
        unsafe { libc::munmap(ptr as *mut libc::c_void, len) };
    }
}
