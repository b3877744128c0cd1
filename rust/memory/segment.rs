//! One guest memory segment: a mapping placed at a guest-physical address, wired (populated and
//! mlock'ed up front) or unwired (faulted on demand), with its own dirty bitmap.
//!
//! Guest bytes are reached only through checked methods: [`Segment::read`], [`Segment::write`],
//! [`Segment::write_untracked`], [`Segment::load`] and [`Segment::store`] check the range against
//! the segment in every build and load a lazily restored range first, and return an error rather
//! than touch memory outside the mapping. Their unchecked twins (`*_unchecked`) are `unsafe` and
//! crate-private, for callers that have checked a whole range once already: `GuestMemory` after
//! [`GuestMemory::translate`](super::GuestMemory::translate), and the vCPU below its checked
//! fast-path limit. So the per-byte paths pay one check per access or batch, never per byte.
//!
//! A segment is anonymous memory, or memfd-backed shared memory ([`Backing::Memfd`]) whose
//! descriptor can be handed to another process (a local migration), which maps the very same
//! pages with [`Segment::map_fd`]. A lazily restored one starts inaccessible and its chunks are
//! filled and opened one by one by the guest's [`LazyImage`] (`lazy.rs`), which every accessor
//! asks first ([`Segment::ensure`]).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use super::address::{human_size, GuestAddress, PAGE_SIZE};
use super::cow::Protection;
use super::error::MemoryError;
use super::install::Installer;
use super::lazy::LazyImage;
use super::prefault::{populate_whole, PrefaultStats};
use crate::dirty::{AtomicBitmap, DirtyLog};

/// A transparent huge page on x86_64 and aarch64 with 4 KiB pages.
const HUGE_PAGE: usize = 2 << 20;

/// Whether the host gives transparent huge pages to memory that asks (`enabled` is `always` or
/// `madvise`), read once.
fn thp_offered() -> bool {
    static OFFERED: OnceLock<bool> = OnceLock::new();
    *OFFERED.get_or_init(|| {
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .is_ok_and(|s| s.contains("[always]") || s.contains("[madvise]"))
    })
}

/// What backs a segment's pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// Private anonymous memory, zero until written (`MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE`).
    Anonymous,
    /// A memfd (`memfd_create` + `ftruncate`) mapped `MAP_SHARED | MAP_NORESERVE`: zero until
    /// written too, and its descriptor lets another process map the same pages.
    Memfd,
}

impl Backing {
    pub fn parse(s: &str) -> Option<Backing> {
        match s {
            "anon" => Some(Backing::Anonymous),
            "memfd" => Some(Backing::Memfd),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Backing::Anonymous => "anon",
            Backing::Memfd => "memfd",
        }
    }
}

/// What to map: the segment's name ("lowmem", "highmem"), where and how large, its backing, and
/// whether it starts inaccessible for a lazy restore (its [`LazyImage`] fills and opens it chunk
/// by chunk).
#[derive(Clone, Debug)]
pub struct SegmentSpec {
    pub name: String,
    pub gpa: GuestAddress,
    pub size: u64,
    pub wired: bool,
    pub backing: Backing,
    pub lazy: bool,
}

/// A mapped segment. Guest memory is shared and mutable across threads (vCPUs, devices,
/// Python views), so it is only ever touched through raw pointers, never through `&mut [u8]`.
/// Its dirty log is the soft bitmap until the guest's memory gives it another backend.
pub struct Segment {
    name: String,
    gpa: GuestAddress,
    size: usize,
    wired: bool,
    base: NonNull<u8>,
    /// The memfd behind a [`Backing::Memfd`] segment (kept open: it is what a local migration
    /// hands over); None for anonymous memory.
    memfd: Option<OwnedFd>,
    dirty: Box<dyn DirtyLog>,
    exports: AtomicUsize,
    closed: AtomicBool,
    /// For a lazily restored segment: the guest's chunk states and where this segment starts in
    /// the image. Set once, right after the segments are mapped.
    lazy: OnceLock<(Arc<LazyImage>, u64)>,
    /// Whether a live snapshot's copy-before-write is armed ([`super::LiveCapture`]): the one
    /// relaxed load every write path makes ([`Segment::before_write`]).
    live_armed: AtomicBool,
    /// The live snapshot's page protection bits, made on the first live snapshot.
    protection: OnceLock<Protection>,
    /// Pages being installed without zeroing (`install.rs`): who holds the registration open.
    install: Mutex<InstallState>,
    /// Pages installed fresh so far, over every installation.
    installed: AtomicU64,
    /// Whether received page data is put on transparent huge pages ([`Segment::receives_huge`]).
    huge_receive: AtomicBool,
    /// Set for good where the kernel would give none ([`Segment::bar_huge_receive`]).
    huge_barred: AtomicBool,
    /// DATA pages received into 2 MiB regions advised for huge pages, over the segment's life.
    huge_received: AtomicU64,
    /// Whether huge pages came cheaper than small ones the last time this segment's memory was
    /// populated ahead ([`Segment::huge_cheaper`]).
    huge_cheaper: AtomicBool,
    /// Whether wiring may put whole 2 MiB regions on huge pages ([`Segment::populates_huge`]).
    wires_huge: bool,
    /// What wiring this segment did ([`Segment::wiring`]); unset for unwired memory.
    wiring: OnceLock<PrefaultStats>,
}

/// A segment's page installation: how many guards hold it, the registration while any does,
/// and why the kernel refused it, once it has (it is not asked again).
#[derive(Default)]
struct InstallState {
    users: usize,
    installer: Option<Arc<Installer>>,
    refused: Option<String>,
}

/// Holds a segment's page installation open ([`Segment::begin_install`], [`Segment::hold_install`]).
/// The registration ends when the last guard of the segment drops.
pub struct InstallGuard<'a> {
    seg: &'a Segment,
    installer: Option<Arc<Installer>>,
}

impl InstallGuard<'_> {
    /// Whether this guard can install pages (a hold alone cannot).
    pub fn can_install(&self) -> bool {
        self.installer.is_some()
    }

    /// Put `src` (whole pages) at `offset` of the segment, as a plain copy would, but without the
    /// kernel zeroing fresh pages first; the caller calls [`Segment::before_write`] first, as for
    /// any write. Pages are counted in [`Segment::installed_pages`]. A hold copies plainly.
    ///
    /// # Safety
    /// `offset..offset+src.len()` must be page-aligned and inside the segment, and nothing may hold
    /// a Rust reference into it.
    pub unsafe fn install(&self, offset: usize, src: &[u8]) {
        debug_assert!(offset.checked_add(src.len()).is_some_and(|end| end <= self.seg.size));
        // SAFETY: the caller's contract: the range is inside the mapping, page-aligned.
        let dst = unsafe { self.seg.base.as_ptr().add(offset) };
        match &self.installer {
            Some(installer) => {
                // SAFETY: as above; the installer registered the whole segment.
                let fresh = unsafe { installer.install(dst, src) };
                self.seg.installed.fetch_add(fresh as u64, Ordering::Relaxed);
            }
            // SAFETY: as above.
            None => unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) },
        }
    }
}

impl Drop for InstallGuard<'_> {
    fn drop(&mut self) {
        let mine = self.installer.take();
        let mut st = self.seg.install.lock().unwrap_or_else(|e| e.into_inner());
        drop(mine);
        st.users -= 1;
        if st.users == 0 {
            // The last reference: unregistered here, under the lock, so a new registration can
            // never meet this one still in place.
            drop(st.installer.take());
        }
    }
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
    /// Map a new segment as `spec` says (a fresh memfd for [`Backing::Memfd`]).
    pub fn map(spec: &SegmentSpec) -> Result<Segment, MemoryError> {
        let size = Self::check_spec(spec)?;
        let memfd = match spec.backing {
            Backing::Anonymous => None,
            Backing::Memfd => Some(create_memfd(&spec.name, spec.size)?),
        };
        Self::map_with(spec, size, memfd)
    }

    /// Map the memfd `fd` (received from another process) as the segment `spec` describes: the
    /// same pages, shared. Refused unless `fd` is a regular file (memfd) of exactly the
    /// segment's size (fstat), naming the segment and both sizes.
    pub fn map_fd(spec: &SegmentSpec, fd: OwnedFd) -> Result<Segment, MemoryError> {
        let size = Self::check_spec(spec)?;
        let what = format!("segment '{}'", spec.name);
        // SAFETY: fstat writes into the struct we own; a bad descriptor is an error return.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(MemoryError::os(format!("fstat of the descriptor received for {what}"), ""));
        }
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(MemoryError::Unsupported {
                what: format!("the descriptor received for {what}"),
                why: "is not a memfd (not a regular file)".into(),
            });
        }
        if st.st_size as u64 != spec.size {
            return Err(MemoryError::BadSize {
                what: format!("the memfd received for {what}"),
                size: st.st_size as u64,
                why: format!("does not match the segment's size of {} ({} bytes)", human_size(spec.size), spec.size),
            });
        }
        Self::map_with(&SegmentSpec { backing: Backing::Memfd, ..spec.clone() }, size, Some(fd))
    }

    /// The checks every mapping passes first; returns the size as usize.
    fn check_spec(spec: &SegmentSpec) -> Result<usize, MemoryError> {
        let what = format!("segment '{}'", spec.name);
        if spec.size == 0 || !spec.size.is_multiple_of(PAGE_SIZE as u64) {
            return Err(MemoryError::BadSize { what, size: spec.size, why: "is not a positive multiple of 4 KiB".into() });
        }
        if !spec.gpa.is_page_aligned() {
            return Err(MemoryError::BadSize { what, size: spec.gpa.0, why: "starts at a GPA that is not page-aligned".into() });
        }
        let size = usize::try_from(spec.size).map_err(|_| MemoryError::BadSize {
            what: what.clone(),
            size: spec.size,
            why: "does not fit the host address space".into(),
        })?;
        if spec.wired && spec.size > physical_memory() {
            return Err(MemoryError::BadSize {
                what: format!("wired {what}"),
                size: spec.size,
                why: format!("cannot be wired: the host has {} of memory", human_size(physical_memory())),
            });
        }
        if spec.lazy && spec.wired {
            return Err(MemoryError::Unsupported {
                what: format!("wired {what}"),
                why: "cannot be restored lazily: wiring would read and copy every page up front; restore wired memory eagerly".into(),
            });
        }
        Ok(size)
    }

    fn map_with(spec: &SegmentSpec, size: usize, memfd: Option<OwnedFd>) -> Result<Segment, MemoryError> {
        let what = format!("segment '{}'", spec.name);
        let prot = if spec.lazy { libc::PROT_NONE } else { libc::PROT_READ | libc::PROT_WRITE };
        let (flags, fd) = match &memfd {
            None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, -1),
            Some(fd) => (libc::MAP_SHARED | libc::MAP_NORESERVE, fd.as_raw_fd()),
        };
        // SAFETY: a fresh mapping (anonymous, or of a memfd we hold) at an address the kernel
        // chooses, so no existing memory is affected.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), size, prot, flags, fd, 0) };
        if ptr == libc::MAP_FAILED {
            return Err(MemoryError::os(format!("cannot map {} for {what}", human_size(spec.size)), ""));
        }
        let base = NonNull::new(ptr as *mut u8).expect("mmap returned NULL without MAP_FIXED");
        // Guest RAM stays on small pages: a guest's first touch populates 4 KiB, not 2 MiB it may
        // never use. Whole 2 MiB regions filled at once go on huge pages: a restore's or a
        // received batch's (`advise_huge`, `receives_huge`), and wired memory's, populated whole
        // as it is wired (`wire`), each where huge pages are timed cheaper (`PageChooser`).
        // Dirty tracking stays per 4 KiB page either way: the soft backend marks small pages
        // whatever backs them, and a write the kernel backend catches splits its huge page.
        // Advisory: ignore errors.
        // SAFETY: the range is the mapping we just created.
        unsafe { libc::madvise(ptr, size, libc::MADV_NOHUGEPAGE) };
        let huge_receive = !spec.wired && memfd.is_none() && !spec.lazy && thp_offered();
        let wires_huge = spec.wired && memfd.is_none() && thp_offered();
        let segment = Segment {
            name: spec.name.clone(),
            gpa: spec.gpa,
            size,
            wired: spec.wired,
            base,
            memfd,
            dirty: Box::new(AtomicBitmap::new(size / PAGE_SIZE)),
            exports: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            lazy: OnceLock::new(),
            live_armed: AtomicBool::new(false),
            protection: OnceLock::new(),
            install: Mutex::new(InstallState::default()),
            installed: AtomicU64::new(0),
            huge_receive: AtomicBool::new(huge_receive),
            huge_barred: AtomicBool::new(false),
            huge_received: AtomicU64::new(0),
            huge_cheaper: AtomicBool::new(true),
            wires_huge,
            wiring: OnceLock::new(),
        };
        if spec.wired {
            // On failure `segment` drops and unmaps.
            segment.wire(&what, spec.size)?;
        }
        Ok(segment)
    }

    /// Populate every page and pin it, as bhyve's -S wires guest memory. It is locked first
    /// without populating (`MLOCK_ONFAULT`), so a too-low RLIMIT_MEMLOCK is refused before a
    /// page is touched. Then it is populated 2 MiB at a time, each whole region on huge pages
    /// or small ones, whichever the steps time cheaper on this host ([`PageChooser::wiring`]).
    /// Last it is locked for good. Why and the A/B: docs/memory.md ("Wired"). An interrupt
    /// (`memory::set_interrupt_check`, asked every 64 MiB) stops it with `MemoryError::Interrupted`;
    /// the caller then drops the segment, and the lock and the pages with it.
    fn wire(&self, what: &str, asked: u64) -> Result<(), MemoryError> {
        let failed = |err: std::io::Error, detail: String| MemoryError::Os {
            what: format!("cannot wire {} for {what}: mlock failed", human_size(asked)),
            errno: err.raw_os_error().unwrap_or(0),
            detail,
        };
        let limit =
            || format!("RLIMIT_MEMLOCK is {}; raise it (ulimit -l) or run with CAP_IPC_LOCK, or use unwired memory", rlimit_memlock());
        let ptr = self.base.as_ptr() as *mut libc::c_void;
        // SAFETY: the range is the mapping we own; locking changes no byte.
        let locked_on_fault = unsafe { libc::mlock2(ptr, self.size, libc::MLOCK_ONFAULT) } == 0;
        let stats = if locked_on_fault {
            // Interrupted: nothing is kept (the caller drops the mapping, and the lock with it).
            populate_whole(self).map_err(|done| MemoryError::Interrupted {
                what: format!("wiring {} for {what} was interrupted after {}", human_size(asked), human_size(done)),
            })?
        } else {
            let err = std::io::Error::last_os_error();
            // A kernel without mlock2 or MLOCK_ONFAULT (before Linux 4.4) wires with mlock alone.
            if !matches!(err.raw_os_error(), Some(libc::ENOSYS | libc::EINVAL)) {
                return Err(failed(err, limit()));
            }
            PrefaultStats { target_bytes: self.size as u64, ..Default::default() }
        };
        // Locked for good: mlock populates what a refused step left (or all of it, where mlock2
        // was not there) and pins it.
        // SAFETY: as above.
        if unsafe { libc::mlock(ptr, self.size) } != 0 {
            let err = std::io::Error::last_os_error();
            // Past mlock2 the limit has let the whole range be locked: what failed is populating.
            let detail =
                if locked_on_fault { "the host could not give the memory; use unwired memory or a smaller guest".into() } else { limit() };
            return Err(failed(err, detail));
        }
        let _ = self.wiring.set(stats);
        Ok(())
    }

    /// What wiring this segment did: the bytes populated in steps, how many of them went on
    /// huge pages, the time it took and which kind of page came cheaper. None for unwired memory.
    pub fn wiring(&self) -> Option<PrefaultStats> {
        self.wiring.get().copied()
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
    pub fn backing(&self) -> Backing {
        if self.memfd.is_some() {
            Backing::Memfd
        } else {
            Backing::Anonymous
        }
    }
    /// Unwired, private anonymous and eagerly mapped: memory whose backing the receive path and
    /// populating ahead may choose (wired memory is populated and locked at start-up, a memfd is
    /// shared with another process, lazily loaded memory is filled chunk by chunk).
    pub(crate) fn plain_anonymous(&self) -> bool {
        !self.wired && self.memfd.is_none() && self.lazy.get().is_none()
    }

    /// The memfd behind the segment (None for anonymous memory): what a local migration hands
    /// over. It stays open as long as the segment.
    pub fn memfd(&self) -> Option<BorrowedFd<'_>> {
        self.memfd.as_ref().map(|fd| fd.as_fd())
    }
    /// The memfd's identity (device, inode): two segments with the same one share their pages.
    pub fn memfd_identity(&self) -> Option<(u64, u64)> {
        let fd = self.memfd.as_ref()?;
        // SAFETY: fstat writes into the struct we own, on a descriptor we hold.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return None;
        }
        Some((st.st_dev, st.st_ino))
    }

    /// Start installing received pages into this segment without zeroing them first
    /// (`install.rs`), or join an installation already open: the guard's installer puts pages in
    /// place until it drops. None where the segment does not take it (wired, a memfd, lazily
    /// restored, closed) or the kernel refused it ([`Segment::install_refused`] says why); the
    /// caller then writes the pages as usual.
    pub fn begin_install(&self) -> Option<InstallGuard<'_>> {
        self.install_guard(true)
    }

    /// Keep this segment's installation open, once something begins it, until the guard drops
    /// (a stream's whole round): batches then join it instead of registering each on its own.
    /// Registers nothing by itself.
    pub fn hold_install(&self) -> Option<InstallGuard<'_>> {
        self.install_guard(false)
    }

    /// The open installation, when one is (for a batch too small to begin one).
    pub fn current_install(&self) -> Option<InstallGuard<'_>> {
        let mut st = self.install.lock().unwrap_or_else(|e| e.into_inner());
        let installer = st.installer.clone()?;
        st.users += 1;
        Some(InstallGuard { seg: self, installer: Some(installer) })
    }

    fn install_guard(&self, begin: bool) -> Option<InstallGuard<'_>> {
        if self.wired || self.memfd.is_some() || self.lazy.get().is_some() || self.is_closed() {
            return None;
        }
        let mut st = self.install.lock().unwrap_or_else(|e| e.into_inner());
        if st.refused.is_some() {
            return None;
        }
        if begin && st.installer.is_none() {
            match Installer::register(self.base.as_ptr(), self.size) {
                Ok(installer) => st.installer = Some(Arc::new(installer)),
                Err(why) => {
                    st.refused = Some(why);
                    return None;
                }
            }
        }
        st.users += 1;
        let installer = if begin { st.installer.clone() } else { None };
        Some(InstallGuard { seg: self, installer })
    }

    /// Pages installed into fresh memory without zeroing, over the segment's life.
    pub fn installed_pages(&self) -> u64 {
        self.installed.load(Ordering::Relaxed)
    }

    /// Why the kernel refused to install pages into this segment, if it has.
    pub fn install_refused(&self) -> Option<String> {
        self.install.lock().unwrap_or_else(|e| e.into_inner()).refused.clone()
    }

    /// Whether pages are being installed into this segment now, and how many touches of pages not
    /// yet there were answered with zeros so far by the open installation.
    pub fn install_open(&self) -> Option<u64> {
        self.install.lock().unwrap_or_else(|e| e.into_inner()).installer.as_ref().map(|i| i.zero_filled())
    }

    /// Make `off..off+len` (inside the segment, page-aligned) read as zero by giving its pages
    /// back: MADV_DONTNEED on private anonymous memory; on a memfd, whose pages outlive any one
    /// mapping (MADV_DONTNEED would only unmap them here), MADV_REMOVE frees them from the file.
    /// Returns false if the kernel refused (the caller then writes zeros).
    pub fn drop_pages(&self, off: usize, len: usize) -> bool {
        if self.check(off, len).is_err() {
            return false;
        }
        self.before_write(off, len);
        let advice = if self.memfd.is_some() { libc::MADV_REMOVE } else { libc::MADV_DONTNEED };
        // SAFETY: the range lies inside our mapping (checked above); the advice changes which
        // pages back it, to zero-filled ones, never memory outside it.
        unsafe { libc::madvise(self.base.as_ptr().add(off) as *mut libc::c_void, len, advice) == 0 }
    }
    /// The mapping's base. Whoever reads or writes guest bytes through it asks [`Segment::ensure`]
    /// for the range first (a lazily restored chunk is inaccessible until loaded and checked),
    /// and whoever writes through it calls [`Segment::before_write`] first.
    pub fn as_ptr(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// Every write to guest bytes calls this first, with the range it is about to change: while a
    /// live snapshot is being written it saves the old bytes of pages not yet saved (`cow.rs`).
    /// When none is, it costs one relaxed load.
    #[inline(always)]
    pub fn before_write(&self, offset: usize, len: usize) {
        if self.live_armed.load(Ordering::Relaxed) && len > 0 {
            self.protection().copy_before_write(self, offset / PAGE_SIZE, (offset + len).div_ceil(PAGE_SIZE).min(self.pages()));
        }
    }

    /// Whether a live snapshot's copy-before-write is armed on this segment.
    pub fn live_armed(&self) -> bool {
        self.live_armed.load(Ordering::Relaxed)
    }

    pub(super) fn set_live_armed(&self, armed: bool) {
        self.live_armed.store(armed, Ordering::Release);
    }

    pub(super) fn protection(&self) -> &Protection {
        self.protection.get_or_init(|| Protection::new(self.pages()))
    }
    /// The segment's dirty log (page 0 = the segment's first page).
    pub fn dirty_log(&self) -> &dyn DirtyLog {
        &*self.dirty
    }

    /// Give the segment another dirty-log backend, before it is shared.
    pub(super) fn set_dirty_log(&mut self, log: Box<dyn DirtyLog>) {
        self.dirty = log;
    }

    /// Tie the segment to its guest's lazy image, `image_offset` bytes into it.
    pub(super) fn set_lazy(&self, image: Arc<LazyImage>, image_offset: u64) {
        let _ = self.lazy.set((image, image_offset));
    }

    /// The lazy image this segment is restored from, if it was restored lazily.
    pub fn lazy_image(&self) -> Option<&Arc<LazyImage>> {
        self.lazy.get().map(|(image, _)| image)
    }

    /// Make bytes `offset..offset+len` of the segment safe to read or write: for a lazily restored
    /// segment, load and check the chunks holding them (an error names the bad chunk); for any
    /// other, nothing. Every accessor of guest bytes calls this (or [`Segment::ensure_all`]) first.
    #[inline]
    pub fn ensure(&self, offset: usize, len: usize) -> Result<(), MemoryError> {
        match self.lazy.get() {
            None => Ok(()),
            Some((image, image_offset)) => image.ensure(image_offset + offset as u64, len),
        }
    }

    /// [`Segment::ensure`] for the whole segment.
    pub fn ensure_all(&self) -> Result<(), MemoryError> {
        self.ensure(0, self.size)
    }

    /// The 2 MiB-aligned part of `off..off+len` (addresses in the mapping), if any: where a
    /// transparent huge page can back bytes all of which lie in the range.
    fn huge_span(&self, off: usize, len: usize) -> Option<(usize, usize)> {
        if off.checked_add(len).is_none_or(|end| end > self.size) {
            return None;
        }
        let start = self.base.as_ptr() as usize + off;
        let (first, end) = (start.next_multiple_of(HUGE_PAGE), (start + len) / HUGE_PAGE * HUGE_PAGE);
        (first < end).then_some((first, end))
    }

    /// How many bytes of `off..off+len` lie in whole 2 MiB regions of the mapping that are still
    /// fresh: what [`Segment::advise_huge`] would put on huge pages. None where any page of
    /// those regions is there already (a later round over memory that is there: advising could
    /// not change how it is backed), or where mincore cannot say.
    pub fn huge_bytes(&self, off: usize, len: usize) -> usize {
        let Some((first, end)) = self.huge_span(off, len) else { return 0 };
        let base = self.base.as_ptr() as usize;
        match self.there((first - base) / PAGE_SIZE, (end - first) / PAGE_SIZE) {
            Some(there) if !there.iter().any(|&b| b) => end - first,
            _ => 0,
        }
    }

    /// Whether every page of `runs` (`(first page, pages)`, ascending, inside the segment) is
    /// there already (one mincore over their span): a later round's pages, or memory populated
    /// while a destination waited. False for no runs, and where mincore cannot say (a swapped-out
    /// page reads as not there: the caller's other path is always right, only slower).
    pub fn all_resident(&self, runs: &[(usize, usize)]) -> bool {
        let (Some(&(first, _)), Some(&(last, last_pages))) = (runs.first(), runs.last()) else { return false };
        let end = last + last_pages;
        let Some(there) = (first < end).then(|| self.there(first, end - first)).flatten() else { return false };
        runs.iter().all(|&(p, n)| p >= first && p + n <= end && there[p - first..p + n - first].iter().all(|&b| b))
    }

    /// Which of `pages` pages from page `first` are there (mincore(2)), one flag per page; None
    /// past the segment or where mincore cannot say.
    fn there(&self, first: usize, pages: usize) -> Option<Vec<bool>> {
        if first.checked_add(pages).is_none_or(|end| end > self.pages()) {
            return None;
        }
        let mut flags = vec![0u8; pages];
        // SAFETY: pages first..first+pages lie inside our mapping (checked); mincore writes one
        // byte per page into `flags`, which has exactly that many.
        let rc =
            unsafe { libc::mincore(self.base.as_ptr().add(first * PAGE_SIZE) as *mut libc::c_void, pages * PAGE_SIZE, flags.as_mut_ptr()) };
        (rc == 0).then(|| flags.into_iter().map(|b| b & 1 != 0).collect())
    }

    /// Ask for transparent huge pages on the 2 MiB-aligned part of `off..off+len`, for a caller
    /// about to fill every byte of that range (a restored file extent, a received run of pages):
    /// one fault and one clear per 2 MiB instead of 512 of each. Only ranges filled whole, so a
    /// sparse guest never grows by a huge page it did not fill. Advisory and anonymous memory
    /// only (THP may be off, or `madvise` as Debian ships it); errors are ignored.
    ///
    /// Measured on this VM: an eager 1 GiB restore from tmpfs went from 0.55 s to 0.15 s of
    /// system time when the memory had been used before, but took longer on memory the
    /// hypervisor had never backed (a first huge-page touch there costs more than 512 small
    /// ones). For a received migration see [`Segment::receives_huge`].
    pub fn advise_huge(&self, off: usize, len: usize) {
        if !self.populates_huge() {
            return;
        }
        if let Some((first, end)) = self.huge_span(off, len) {
            // SAFETY: first..end lies inside off..off+len, inside our mapping (checked by
            // huge_span); MADV_HUGEPAGE changes how pages are backed, never their bytes.
            unsafe { libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE) };
        }
    }

    /// Undo [`Segment::advise_huge`] on the same range once it is filled: later first touches
    /// there (the guest's) take small pages again, as everywhere else in guest RAM, and the huge
    /// pages already in place stay. Advisory; errors are ignored.
    pub fn advise_small(&self, off: usize, len: usize) {
        // Not guarded by `populates_huge`, which a receiver may turn off between the two calls:
        // going back to small pages is always safe.
        if let Some((first, end)) = self.huge_span(off, len) {
            // SAFETY: as in advise_huge; MADV_NOHUGEPAGE changes only how later faults are backed.
            unsafe { libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_NOHUGEPAGE) };
        }
    }

    /// Whether page data received into this segment (a migration's pages) goes onto transparent
    /// huge pages where whole 2 MiB regions of it arrive together, read straight into place,
    /// instead of being installed 4 KiB at a time with userfaultfd (`install.rs`). On by default
    /// for unwired, private anonymous, eagerly mapped segments where the host offers huge pages
    /// (`/sys/kernel/mm/transparent_hugepage/enabled` is not `never`). A/B in docs/memory.md.
    pub fn receives_huge(&self) -> bool {
        self.huge_receive.load(Ordering::Relaxed)
    }

    /// Choose [`Segment::receives_huge`] (tests pin either path; turning it on where the segment
    /// cannot take huge pages is ignored). It also forgets what a population measured
    /// ([`Segment::huge_cheaper`]).
    pub fn set_receives_huge(&self, on: bool) {
        let can = self.plain_anonymous() && !self.huge_barred.load(Ordering::Relaxed) && thp_offered();
        self.huge_receive.store(on && can, Ordering::Relaxed);
        self.huge_cheaper.store(true, Ordering::Relaxed);
    }

    /// Whether huge pages came cheaper than small ones when this segment's memory was last
    /// populated ahead: the population times its steps on both and takes the cheaper
    /// (`prefault.rs`), and a received batch goes onto huge pages only where
    /// [`Segment::receives_huge`] and this say so. True until a population has measured. On a VM
    /// whose kernel hands free memory back to the hypervisor (free page reporting), the whole
    /// free 2 MiB blocks huge pages are made of are the ones the hypervisor took back, and small
    /// pages, from smaller free blocks it still backs, can be much cheaper (populating: 1.2 s for
    /// 3 GiB against 6-8 s; a warm 1 GiB migration about twice as fast).
    pub fn huge_cheaper(&self) -> bool {
        self.huge_cheaper.load(Ordering::Relaxed)
    }

    /// Whether a population of this segment may put whole 2 MiB regions on huge pages: where
    /// received pages may ([`Segment::receives_huge`]), and wired anonymous memory, populated
    /// whole as it is wired, where the host offers huge pages.
    pub(crate) fn populates_huge(&self) -> bool {
        self.wires_huge || self.receives_huge()
    }

    pub(crate) fn set_huge_cheaper(&self, cheaper: bool) {
        self.huge_cheaper.store(cheaper, Ordering::Relaxed);
    }

    /// Receive on small pages for good: the kernel gives no huge page to this mapping (the kernel
    /// dirty backend has registered it for write-protection).
    pub(crate) fn bar_huge_receive(&self) {
        self.huge_barred.store(true, Ordering::Relaxed);
        self.huge_receive.store(false, Ordering::Relaxed);
    }

    /// DATA pages received into whole 2 MiB regions advised for huge pages, over the segment's
    /// life (whether the kernel found a huge page for each is its own affair: see AnonHugePages).
    pub fn huge_received_pages(&self) -> u64 {
        self.huge_received.load(Ordering::Relaxed)
    }

    /// Count `pages` as received into huge-page regions.
    pub(crate) fn count_huge_received(&self, pages: u64) {
        self.huge_received.fetch_add(pages, Ordering::Relaxed);
    }

    /// How many pages this process has mapped in the segment (present or swapped PTEs, from
    /// /proc/self/pagemap): what has been faulted in or loaded.
    pub fn mapped_pages(&self) -> Result<usize, MemoryError> {
        use std::os::unix::fs::FileExt;
        const PM_PRESENT: u64 = 1 << 63;
        const PM_SWAP: u64 = 1 << 62;
        // A swap entry with the uffd-wp bit is, in practice, the marker the kernel dirty backend
        // puts in never-touched entries: not a page the guest has.
        const PM_UFFD_WP: u64 = 1 << 57;
        const BATCH: usize = 64 * 1024;
        let pagemap = std::fs::File::open("/proc/self/pagemap").map_err(|e| MemoryError::Os {
            what: "opening /proc/self/pagemap".into(),
            errno: e.raw_os_error().unwrap_or(0),
            detail: String::new(),
        })?;
        let mut buf = vec![0u8; BATCH * 8];
        let first_vpn = self.base.as_ptr() as u64 / PAGE_SIZE as u64;
        let mut count = 0;
        let mut page = 0;
        while page < self.pages() {
            let n = BATCH.min(self.pages() - page);
            pagemap.read_exact_at(&mut buf[..n * 8], (first_vpn + page as u64) * 8).map_err(|e| MemoryError::Os {
                what: format!("reading /proc/self/pagemap for segment '{}'", self.name),
                errno: e.raw_os_error().unwrap_or(0),
                detail: String::new(),
            })?;
            count += buf[..n * 8]
                .chunks_exact(8)
                .filter(|e| {
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

    /// Check that `offset..offset+len` lies inside the segment, in every build.
    #[inline]
    fn check(&self, offset: usize, len: usize) -> Result<(), MemoryError> {
        if offset <= self.size && len <= self.size - offset {
            Ok(())
        } else {
            Err(MemoryError::OutOfSegment { segment: self.name.clone(), offset: offset as u64, len: len as u64, size: self.size as u64 })
        }
    }

    /// Check `offset..offset+len` and make it accessible ([`Segment::ensure`]).
    #[inline]
    fn checked(&self, offset: usize, len: usize) -> Result<(), MemoryError> {
        self.check(offset, len)?;
        self.ensure(offset, len)
    }

    /// Copy `out.len()` bytes from `offset`; an error, and nothing read, if the range is not
    /// inside the segment or a lazily restored chunk of it cannot be loaded.
    pub fn read(&self, offset: usize, out: &mut [u8]) -> Result<(), MemoryError> {
        self.checked(offset, out.len())?;
        // SAFETY: checked and made accessible just above.
        unsafe { self.read_unchecked(offset, out) };
        Ok(())
    }

    /// Copy `data` in at `offset` and mark the pages dirty (after the copy, so a harvest that
    /// clears the bit before the copy lands sees the bit again next round). Checked as
    /// [`Segment::read`].
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<(), MemoryError> {
        self.checked(offset, data.len())?;
        // SAFETY: checked and made accessible just above.
        unsafe { self.write_unchecked(offset, data) };
        Ok(())
    }

    /// Copy `data` in without marking pages dirty: restore and migration receive, which load
    /// memory into a guest that is not running. Checked as [`Segment::read`].
    pub fn write_untracked(&self, offset: usize, data: &[u8]) -> Result<(), MemoryError> {
        self.checked(offset, data.len())?;
        // SAFETY: checked and made accessible just above.
        unsafe { self.write_untracked_unchecked(offset, data) };
        Ok(())
    }

    /// Load an `N`-byte little-endian value. Checked as [`Segment::read`].
    pub fn load<const N: usize>(&self, offset: usize) -> Result<[u8; N], MemoryError> {
        self.checked(offset, N)?;
        // SAFETY: checked and made accessible just above.
        Ok(unsafe { self.load_unchecked::<N>(offset) })
    }

    /// Store an `N`-byte value and mark its page(s) dirty. Checked as [`Segment::read`].
    pub fn store<const N: usize>(&self, offset: usize, bytes: [u8; N]) -> Result<(), MemoryError> {
        self.checked(offset, N)?;
        // SAFETY: checked and made accessible just above.
        unsafe { self.store_unchecked::<N>(offset, bytes) };
        Ok(())
    }

    /// [`Segment::read`] without the checks.
    ///
    /// # Safety
    /// `offset..offset+out.len()` lies inside the segment and has been made accessible
    /// ([`Segment::ensure`]) since the segment was mapped.
    #[inline]
    pub(crate) unsafe fn read_unchecked(&self, offset: usize, out: &mut [u8]) {
        debug_assert!(self.check(offset, out.len()).is_ok());
        // SAFETY: the caller promises the range is inside the mapping and accessible; `out` is ours.
        unsafe { std::ptr::copy_nonoverlapping(self.base.as_ptr().add(offset), out.as_mut_ptr(), out.len()) }
    }

    /// [`Segment::write`] without the checks.
    ///
    /// # Safety
    /// As [`Segment::read_unchecked`], for `offset..offset+data.len()`.
    #[inline]
    pub(crate) unsafe fn write_unchecked(&self, offset: usize, data: &[u8]) {
        // SAFETY: the caller's promise is ours.
        unsafe { self.write_untracked_unchecked(offset, data) };
        self.dirty.mark(offset / PAGE_SIZE, (offset + data.len()).div_ceil(PAGE_SIZE));
    }

    /// [`Segment::write_untracked`] without the checks.
    ///
    /// # Safety
    /// As [`Segment::read_unchecked`], for `offset..offset+data.len()`.
    #[inline]
    pub(crate) unsafe fn write_untracked_unchecked(&self, offset: usize, data: &[u8]) {
        debug_assert!(self.check(offset, data.len()).is_ok());
        self.before_write(offset, data.len());
        // SAFETY: the range is inside the mapping and accessible (the caller promises); `data`
        // cannot alias the mapping mutably because nothing hands out `&mut` into it.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.base.as_ptr().add(offset), data.len()) }
    }

    /// [`Segment::load`] without the checks: the vCPU's loads.
    ///
    /// # Safety
    /// As [`Segment::read_unchecked`], for `offset..offset+N`.
    #[inline]
    pub(crate) unsafe fn load_unchecked<const N: usize>(&self, offset: usize) -> [u8; N] {
        debug_assert!(self.check(offset, N).is_ok());
        // SAFETY: in range and accessible (the caller promises); read_unaligned allows any alignment.
        unsafe { std::ptr::read_unaligned(self.base.as_ptr().add(offset) as *const [u8; N]) }
    }

    /// [`Segment::store`] without the checks: the vCPU's stores.
    ///
    /// # Safety
    /// As [`Segment::read_unchecked`], for `offset..offset+N`.
    #[inline]
    pub(crate) unsafe fn store_unchecked<const N: usize>(&self, offset: usize, bytes: [u8; N]) {
        debug_assert!(self.check(offset, N).is_ok());
        self.before_write(offset, N);
        // SAFETY: in range and accessible (the caller promises); write_unaligned allows any alignment.
        unsafe { std::ptr::write_unaligned(self.base.as_ptr().add(offset) as *mut [u8; N], bytes) }
        let first = offset / PAGE_SIZE;
        self.dirty.mark_page(first);
        let last = (offset + N - 1) / PAGE_SIZE;
        if last != first {
            self.dirty.mark_page(last);
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
        self.there(0, self.pages()).ok_or_else(|| MemoryError::os(format!("mincore on segment '{}'", self.name), ""))
    }
}

/// A new memfd of `size` bytes, named after the segment (`/proc/PID/fd` shows `memfd:vmmpy-lowmem`).
fn create_memfd(name: &str, size: u64) -> Result<OwnedFd, MemoryError> {
    let what = format!("segment '{name}'");
    let cname = std::ffi::CString::new(format!("vmmpy-{name}")).map_err(|_| MemoryError::BadSize {
        what: what.clone(),
        size,
        why: "has a name with a NUL byte".into(),
    })?;
    // SAFETY: memfd_create reads the NUL-terminated name; a failure is an error return.
    let raw = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if raw < 0 {
        return Err(MemoryError::os(format!("memfd_create for {what}"), ""));
    }
    // SAFETY: memfd_create returned a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ftruncate on the descriptor we own.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) } != 0 {
        return Err(MemoryError::os(format!("ftruncate of the memfd for {what} to {}", human_size(size)), ""));
    }
    Ok(fd)
}

impl Drop for Segment {
    fn drop(&mut self) {
        // SAFETY: we own the mapping and nothing can reach it once the last owner drops.
        unsafe { libc::munmap(self.base.as_ptr() as *mut libc::c_void, self.size) };
    }
}
