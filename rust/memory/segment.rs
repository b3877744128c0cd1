//! One guest memory segment: a mapping placed at a guest-physical address, wired (populated and
//! mlock'ed up front) or unwired (faulted on demand), with its own dirty bitmap.
//!
//! A segment is anonymous memory, or a private mapping of a checkpoint memory file (lazy
//! restore): pages load from the file on first touch and a write makes a private copy, so the
//! file is never modified. Such a segment keeps its own descriptor of the file (a `dup`) to ask
//! where the file holds data (SEEK_DATA), because there "never touched" does not mean "zero".

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::address::{human_size, GuestAddress, PAGE_SIZE};
use super::error::MemoryError;
use crate::dirty::AtomicBitmap;

/// What a segment is mapped from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// Anonymous memory, zero until written (`MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE`).
    Anonymous,
    /// `size` bytes of the file open at `fd` from byte `offset`, mapped `MAP_PRIVATE`: reads load
    /// the file's pages on demand, writes go to private copy-on-write pages. The fd is borrowed for
    /// the call to [`Segment::map`], which keeps a duplicate. The file must not be truncated or
    /// written while the segment lives (a truncation would make guest accesses fault with SIGBUS).
    PrivateFile { fd: RawFd, offset: u64 },
}

/// What to map: the segment's name ("lowmem", "highmem"), where and how large.
#[derive(Clone, Debug)]
pub struct SegmentSpec {
    pub name: String,
    pub gpa: GuestAddress,
    pub size: u64,
    pub wired: bool,
    pub backing: Backing,
}

/// A mapped segment. Guest memory is shared and mutable across threads (vCPUs, devices,
/// Python views), so it is only ever touched through raw pointers, never through `&mut [u8]`.
pub struct Segment {
    name: String,
    gpa: GuestAddress,
    size: usize,
    wired: bool,
    base: NonNull<u8>,
    dirty: AtomicBitmap,
    exports: AtomicUsize,
    closed: AtomicBool,
    file: Option<FileBacking>,
}

/// The file behind a `PrivateFile` segment: our own descriptor and where the segment starts in it.
struct FileBacking {
    fd: OwnedFd,
    offset: u64,
}

// SAFETY: the mapping is plain memory owned by this struct until Drop; concurrent access to guest
// memory is the nature of a VMM (vCPUs and devices race like real hardware) and is done with raw
// copies, never through Rust references into the mapping.
unsafe impl Send for Segment {}
unsafe impl Sync for Segment {}

fn rlimit_memlock() -> String {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0 {
        return "unknown".to_string();
    }
    if lim.rlim_cur == libc::RLIM_INFINITY {
        "unlimited".to_string()
    } else {
        human_size(lim.rlim_cur)
    }
}

pub(super) fn physical_memory() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if pages <= 0 || page <= 0 {
        return u64::MAX;
    }
    pages as u64 * page as u64
}

impl Segment {
    pub fn map(spec: &SegmentSpec) -> Result<Segment, MemoryError> {
        let what = format!("segment '{}'", spec.name);
        if spec.size == 0 || spec.size % PAGE_SIZE as u64 != 0 {
            return Err(MemoryError::BadSize { what, size: spec.size, why: "is not a positive multiple of 4 KiB".into() });
        }
        if !spec.gpa.is_page_aligned() {
            return Err(MemoryError::BadSize { what, size: spec.gpa.0, why: "starts at a GPA that is not page-aligned".into() });
        }
        let size = usize::try_from(spec.size)
            .map_err(|_| MemoryError::BadSize { what: what.clone(), size: spec.size, why: "does not fit the host address space".into() })?;
        if spec.wired && spec.size > physical_memory() {
            return Err(MemoryError::BadSize {
                what: format!("wired {what}"),
                size: spec.size,
                why: format!("cannot be wired: the host has {} of memory", human_size(physical_memory())),
            });
        }
        let file = match spec.backing {
            Backing::Anonymous => None,
            Backing::PrivateFile { fd, offset } => Some(open_backing_file(&what, spec, fd, offset)?),
        };
        let (flags, fd, offset) = match &file {
            None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, -1, 0),
            Some(f) => (libc::MAP_PRIVATE | libc::MAP_NORESERVE, f.fd.as_raw_fd(), f.offset as libc::off_t),
        };
        // SAFETY: a fresh mapping at an address the kernel chooses (anonymous, or a private view of
        // a file we hold open), so no existing memory is affected.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), size, libc::PROT_READ | libc::PROT_WRITE, flags, fd, offset) };
        if ptr == libc::MAP_FAILED {
            return Err(MemoryError::os(format!("cannot map {} for {what}", human_size(spec.size)), ""));
        }
        let base = NonNull::new(ptr as *mut u8).expect("mmap returned NULL without MAP_FIXED");
        // Dirty tracking is per 4 KiB page; a transparent huge page would be tracked as 512 pages
        // at once by the kernel backend, so keep guest RAM on small pages. Advisory: ignore errors.
        // SAFETY: the range is the mapping we just created.
        unsafe { libc::madvise(ptr, size, libc::MADV_NOHUGEPAGE) };
        let segment = Segment {
            name: spec.name.clone(),
            gpa: spec.gpa,
            size,
            wired: spec.wired,
            base,
            dirty: AtomicBitmap::new(size / PAGE_SIZE),
            exports: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            file,
        };
        if spec.wired {
            // mlock populates every page and pins it, as bhyve's -S wires guest memory.
            // SAFETY: the range is the mapping we own.
            if unsafe { libc::mlock(ptr, size) } != 0 {
                return Err(MemoryError::os(
                    format!("cannot wire {} for {what}: mlock failed", human_size(spec.size)),
                    format!(
                        "RLIMIT_MEMLOCK is {}; raise it (ulimit -l) or run with CAP_IPC_LOCK, or use unwired memory",
                        rlimit_memlock()
                    ),
                ));
                // `segment` drops here and unmaps.
            }
        }
        Ok(segment)
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn gpa(&self) -> GuestAddress {
        self.gpa
    }
    pub fn size(&self) -> usize {
        self.size
    }
    pub fn pages(&self) -> usize {
        self.size / PAGE_SIZE
    }
    pub fn wired(&self) -> bool {
        self.wired
    }
    pub fn as_ptr(&self) -> *mut u8 {
        self.base.as_ptr()
    }
    pub fn dirty_bitmap(&self) -> &AtomicBitmap {
        &self.dirty
    }

    /// Whether the segment is a private mapping of a file (lazy restore) rather than anonymous.
    /// There, MADV_DONTNEED brings back the file's bytes, not zeros.
    pub fn is_file_backed(&self) -> bool {
        self.file.is_some()
    }

    /// Ask for transparent huge pages on the 2 MiB-aligned part of `off..off+len`, for a caller
    /// about to fill every byte of that range (a restored file extent): one fault and one clear
    /// per 2 MiB instead of 512 of each. Only ranges filled whole, so a sparse guest never grows
    /// by a huge page it did not fill. Advisory and anonymous memory only (THP may be off, or
    /// `madvise` as Debian ships it); errors are ignored.
    ///
    /// Measured on this VM: an eager 1 GiB restore from tmpfs went from 0.55 s to 0.15 s of
    /// system time when the memory had been used before, but took longer on memory the
    /// hypervisor had never backed (a first huge-page touch there costs more than 512 small
    /// ones). Receiving a migration showed no difference either way, so it does not ask.
    pub fn advise_huge(&self, off: usize, len: usize) {
        const HUGE_PAGE: usize = 2 << 20;
        if self.file.is_some() || self.wired || off.checked_add(len).is_none_or(|end| end > self.size) {
            return;
        }
        let start = self.base.as_ptr() as usize + off;
        let (first, end) = (start.next_multiple_of(HUGE_PAGE), (start + len) / HUGE_PAGE * HUGE_PAGE);
        if first < end {
            // SAFETY: first..end lies inside off..off+len, inside our mapping (checked above);
            // MADV_HUGEPAGE changes how pages are backed, never their bytes.
            unsafe { libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE) };
        }
    }

    /// For a file-backed segment, the (device, inode) of its file: a writer must never truncate
    /// the file a guest is mapped from.
    pub fn backing_file_id(&self) -> Option<(u64, u64)> {
        let file = self.file.as_ref()?;
        // SAFETY: fstat writes into the struct we own.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(file.fd.as_raw_fd(), &mut st) } != 0 {
            return None;
        }
        Some((st.st_dev, st.st_ino))
    }

    /// For a file-backed segment, the page runs `(first_page, count)` of the segment where the
    /// backing file holds data (SEEK_DATA); pages outside them read as zero until written.
    /// `None` for anonymous memory.
    pub fn file_data_runs(&self) -> Result<Option<Vec<(usize, usize)>>, MemoryError> {
        let Some(file) = &self.file else { return Ok(None) };
        let extents = file_data_extents(file.fd.as_raw_fd(), file.offset, file.offset + self.size as u64)
            .map_err(|e| MemoryError::Os { what: format!("finding the data in the file behind segment '{}'", self.name), errno: e.raw_os_error().unwrap_or(0), detail: String::new() })?;
        let page = PAGE_SIZE as u64;
        Ok(Some(
            extents
                .into_iter()
                .map(|(start, end)| {
                    let first = (start - file.offset) / page;
                    let last = (end - file.offset).div_ceil(page);
                    (first as usize, (last - first) as usize)
                })
                .collect(),
        ))
    }

    /// How many pages this process has mapped in the segment (present or swapped PTEs, from
    /// /proc/self/pagemap). Unlike [`Segment::resident`], which for a file mapping also counts
    /// file pages sitting in the page cache, this counts only what the guest has faulted in.
    pub fn mapped_pages(&self) -> Result<usize, MemoryError> {
        use std::os::unix::fs::FileExt;
        const PM_PRESENT: u64 = 1 << 63;
        const PM_SWAP: u64 = 1 << 62;
        // A swap entry with the uffd-wp bit is, in practice, the marker the kernel dirty backend
        // puts in never-touched entries of a file mapping: not a page the guest has.
        const PM_UFFD_WP: u64 = 1 << 57;
        const BATCH: usize = 64 * 1024;
        let pagemap = std::fs::File::open("/proc/self/pagemap")
            .map_err(|e| MemoryError::Os { what: "opening /proc/self/pagemap".into(), errno: e.raw_os_error().unwrap_or(0), detail: String::new() })?;
        let mut buf = vec![0u8; BATCH * 8];
        let first_vpn = self.base.as_ptr() as u64 / PAGE_SIZE as u64;
        let mut count = 0;
        let mut page = 0;
        while page < self.pages() {
            let n = BATCH.min(self.pages() - page);
            pagemap
                .read_exact_at(&mut buf[..n * 8], (first_vpn + page as u64) * 8)
                .map_err(|e| MemoryError::Os { what: format!("reading /proc/self/pagemap for segment '{}'", self.name), errno: e.raw_os_error().unwrap_or(0), detail: String::new() })?;
            count += buf[..n * 8].chunks_exact(8).filter(|e| {
                    let entry = u64::from_le_bytes((*e).try_into().unwrap());
                    entry & PM_PRESENT != 0 || (entry & PM_SWAP != 0 && entry & PM_UFFD_WP == 0)
                })
                .count();
            page += n;
        }
        Ok(count)
    }

    /// Whether `gpa..gpa+len` lies inside this segment; on success the offset of `gpa`.
    #[inline]
    pub fn offset_of(&self, gpa: GuestAddress, len: usize) -> Option<usize> {
        let off = gpa.0.checked_sub(self.gpa.0)?;
        if off < self.size as u64 && len as u64 <= self.size as u64 - off {
            Some(off as usize)
        } else {
            None
        }
    }

    #[inline]
    pub fn contains(&self, gpa: GuestAddress) -> bool {
        gpa.0 >= self.gpa.0 && gpa.0 - self.gpa.0 < self.size as u64
    }

    /// Copy `out.len()` bytes from `offset`. The caller has checked the range (`offset_of`).
    #[inline]
    pub fn read(&self, offset: usize, out: &mut [u8]) {
        debug_assert!(offset + out.len() <= self.size);
        // SAFETY: the range is inside the mapping (checked by the caller) and `out` is ours.
        unsafe { std::ptr::copy_nonoverlapping(self.base.as_ptr().add(offset), out.as_mut_ptr(), out.len()) }
    }

    /// Copy `data` in at `offset` and mark the pages dirty (after the copy, so a harvest that
    /// clears the bit before the copy lands sees the bit again next round).
    #[inline]
    pub fn write(&self, offset: usize, data: &[u8]) {
        self.write_untracked(offset, data);
        self.dirty.set_range(offset / PAGE_SIZE, (offset + data.len()).div_ceil(PAGE_SIZE));
    }

    /// Copy `data` in without marking pages dirty: restore and migration receive, which load
    /// memory into a guest that is not running.
    #[inline]
    pub fn write_untracked(&self, offset: usize, data: &[u8]) {
        debug_assert!(offset + data.len() <= self.size);
        // SAFETY: the range is inside the mapping (checked by the caller); `data` cannot alias the
        // mapping mutably because nothing hands out `&mut` into it.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.base.as_ptr().add(offset), data.len()) }
    }

    /// Load an `N`-byte little-endian value (the vCPU's loads).
    #[inline]
    pub fn load<const N: usize>(&self, offset: usize) -> [u8; N] {
        debug_assert!(offset + N <= self.size);
        // SAFETY: in range (caller-checked); read_unaligned allows any alignment.
        unsafe { std::ptr::read_unaligned(self.base.as_ptr().add(offset) as *const [u8; N]) }
    }

    /// Store an `N`-byte value and mark its page(s) dirty (the vCPU's stores).
    #[inline]
    pub fn store<const N: usize>(&self, offset: usize, bytes: [u8; N]) {
        debug_assert!(offset + N <= self.size);
        // SAFETY: in range (caller-checked); write_unaligned allows any alignment.
        unsafe { std::ptr::write_unaligned(self.base.as_ptr().add(offset) as *mut [u8; N], bytes) }
        let first = offset / PAGE_SIZE;
        self.dirty.set(first);
        let last = (offset + N - 1) / PAGE_SIZE;
        if last != first {
            self.dirty.set(last);
        }
    }

    /// Count a buffer-protocol export (a memoryview or numpy array over this segment).
    pub fn add_export(&self) -> Result<(), MemoryError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(MemoryError::Closed { segment: self.name.clone() });
        }
        self.exports.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }
    pub fn release_export(&self) {
        self.exports.fetch_sub(1, Ordering::AcqRel);
    }
    pub fn exports(&self) -> usize {
        self.exports.load(Ordering::Acquire)
    }

    /// Mark the segment closed: no new views, no new accesses through `GuestMemory`. The mapping
    /// itself goes when the last owner (a running vCPU may hold one) drops it.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Which pages are resident (have been touched), one flag per page, from mincore(2).
    pub fn resident(&self) -> Result<Vec<bool>, MemoryError> {
        let mut vec = vec![0u8; self.pages()];
        // SAFETY: the range is our mapping and `vec` has one byte per page.
        if unsafe { libc::mincore(self.base.as_ptr() as *mut libc::c_void, self.size, vec.as_mut_ptr()) } != 0 {
            return Err(MemoryError::os(format!("mincore on segment '{}'", self.name), ""));
        }
        Ok(vec.into_iter().map(|b| b & 1 != 0).collect())
    }
}

/// Duplicate the caller's descriptor for a `PrivateFile` segment and check that the file covers
/// the whole segment, so no guest access can run past its end (SIGBUS).
fn open_backing_file(what: &str, spec: &SegmentSpec, fd: RawFd, offset: u64) -> Result<FileBacking, MemoryError> {
    if spec.wired {
        return Err(MemoryError::Unsupported {
            what: format!("wired {what}"),
            why: "cannot be mapped lazily from a file: wiring would read and copy every page up front; restore wired memory eagerly".into(),
        });
    }
    if offset % PAGE_SIZE as u64 != 0 {
        return Err(MemoryError::BadSize { what: format!("file offset of {what}"), size: offset, why: "is not page-aligned".into() });
    }
    // SAFETY: F_DUPFD_CLOEXEC only reads the descriptor number; a bad fd is reported as EBADF.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(MemoryError::os(format!("cannot duplicate fd {fd} backing {what}"), ""));
    }
    // SAFETY: fcntl returned a fresh descriptor that nothing else owns.
    let file = FileBacking { fd: unsafe { OwnedFd::from_raw_fd(dup) }, offset };
    // SAFETY: fstat writes into the struct we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(dup, &mut st) } != 0 {
        return Err(MemoryError::os(format!("cannot stat the file backing {what}"), ""));
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(MemoryError::Unsupported { what: format!("fd {fd} backing {what}"), why: "is not a regular file".into() });
    }
    let needed = offset.saturating_add(spec.size);
    if (st.st_size as u64) < needed {
        return Err(MemoryError::BadSize {
            what: format!("file backing {what}"),
            size: st.st_size as u64,
            why: format!("is too short: the segment needs bytes {offset}..{needed} of it"),
        });
    }
    Ok(file)
}

/// The data extents `(start, end)` of the file at `fd` within `start..end`, from
/// SEEK_DATA/SEEK_HOLE. Filesystems without hole support report one extent for everything.
pub fn file_data_extents(fd: RawFd, start: u64, end: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        // SAFETY: lseek has no memory effects; a bad fd is an error return.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break; // no data at or after `pos`
            }
            return Err(err);
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let hole = (hole as u64).min(end);
        out.push((data, hole));
        pos = hole;
    }
    Ok(out)
}

impl Drop for Segment {
    fn drop(&mut self) {
        // SAFETY: we own the mapping and nothing can reach it once the last owner drops.
        unsafe { libc::munmap(self.base.as_ptr() as *mut libc::c_void, self.size) };
    }
}
