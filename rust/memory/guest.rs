//! A guest's memory: its segments, address translation, and the dirty-tracking backend.
//!
//! The backend is chosen here, once, and handed to every segment as its
//! [`DirtyLog`](crate::dirty::DirtyLog); from then on writers mark and harvesters harvest through
//! the trait and never ask which backend it is.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, OnceLock};

use super::address::{human_size, GuestAddress, PAGE_SIZE};
use super::cow::LiveCapture;
use super::error::MemoryError;
use super::lazy::{ChunkSource, LazyImage};
use super::prefault::{self, Prefault, PrefaultStats};
use super::segment::{physical_memory, Backing, Segment, SegmentSpec};
use crate::dirty::{Backend, DirtyLogError, KernelLog, KernelTracker, TrackingChoice};
use crate::kvm::{DirtyMode, KvmVm};

/// bhyve's VM_LOWMEM_LIMIT: lowmem ends here at most, below the PCI hole.
pub const LOWMEM_LIMIT_DEFAULT: u64 = 3 << 30;
/// bhyve's VM_HIGHMEM_BASE: memory above the lowmem limit is mapped from 4 GiB up.
pub const HIGHMEM_BASE: u64 = 4 << 30;

#[derive(Clone, Debug)]
pub struct MemoryOptions {
    pub memsize: u64,
    pub wired: bool,
    pub lowmem_limit: u64,
    pub tracking: TrackingChoice,
    pub backing: Backing,
}

impl MemoryOptions {
    pub fn new(memsize: u64) -> MemoryOptions {
        MemoryOptions {
            memsize,
            wired: false,
            lowmem_limit: LOWMEM_LIMIT_DEFAULT,
            tracking: TrackingChoice::Soft,
            backing: Backing::Anonymous,
        }
    }

    /// The segments bhyve's `vm_setup_memory` would create for these options.
    pub fn layout(&self) -> Result<Vec<SegmentSpec>, MemoryError> {
        let page = PAGE_SIZE as u64;
        if self.memsize == 0 || !self.memsize.is_multiple_of(page) {
            return Err(MemoryError::BadSize {
                what: "guest memory size".into(),
                size: self.memsize,
                why: "is not a positive multiple of 4 KiB".into(),
            });
        }
        if self.lowmem_limit == 0 || !self.lowmem_limit.is_multiple_of(page) || self.lowmem_limit > HIGHMEM_BASE {
            return Err(MemoryError::BadSize {
                what: "lowmem limit".into(),
                size: self.lowmem_limit,
                why: format!("must be a positive multiple of 4 KiB no larger than {}", human_size(HIGHMEM_BASE)),
            });
        }
        let low = self.memsize.min(self.lowmem_limit);
        let mut specs = vec![SegmentSpec {
            name: "lowmem".into(),
            gpa: GuestAddress(0),
            size: low,
            wired: self.wired,
            backing: self.backing,
            lazy: false,
        }];
        if self.memsize > low {
            let high = self.memsize - low;
            if HIGHMEM_BASE.checked_add(high).is_none() {
                return Err(MemoryError::BadSize {
                    what: "guest memory size".into(),
                    size: self.memsize,
                    why: "does not fit the guest-physical address space".into(),
                });
            }
            specs.push(SegmentSpec {
                name: "highmem".into(),
                gpa: GuestAddress(HIGHMEM_BASE),
                size: high,
                wired: self.wired,
                backing: self.backing,
                lazy: false,
            });
        }
        Ok(specs)
    }
}

/// Why "auto" picks the soft backend for lazily restored memory (measured on Linux 6.18).
pub const LAZY_KERNEL_TRACKING_COST: &str = "memory restored lazily from a checkpoint: setting up the kernel backend \
(userfaultfd write-protect registration and its first scan) costs about 2-3 ms per GiB of guest (34-41 ms for 16 GiB), \
so restore time would grow with guest size, which lazy restore exists to avoid; ask for 'kernel' explicitly to have it anyway";

pub struct GuestMemory {
    segments: Vec<Arc<Segment>>,
    memsize: u64,
    lowmem_limit: u64,
    backend: Backend,
    /// Why "auto" fell back to the soft backend, if it did.
    fallback_reason: Option<String>,
    /// For lazily restored memory (or a post-copy migration's destination once it switched):
    /// the chunk states every segment shares.
    lazy: OnceLock<Arc<LazyImage>>,
    /// With the KVM backend: the KVM VM whose memory slots are these segments (its vCPUs run on it).
    kvm: Option<Arc<KvmVm>>,
    /// Populating the memory while a migration destination waits ([`GuestMemory::start_prefault`]).
    prefault: Mutex<Option<Prefault>>,
}

fn host_page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

fn check_host_page_size() -> Result<(), MemoryError> {
    if host_page_size() != PAGE_SIZE {
        return Err(MemoryError::BadSize {
            what: "host page size".into(),
            size: host_page_size() as u64,
            why: "is not 4 KiB; vmmpy tracks and migrates 4 KiB pages".into(),
        });
    }
    Ok(())
}

impl GuestMemory {
    pub fn new(opts: &MemoryOptions) -> Result<GuestMemory, MemoryError> {
        check_host_page_size()?;
        let specs = opts.layout()?;
        Self::build(opts, &specs)
    }

    /// Guest memory restored lazily from `source`, an image of lowmem then highmem cut into
    /// chunks of `chunk_size` bytes: nothing is read now, so this costs the same for any guest
    /// size; each chunk is loaded and checked by the source the first time anything asks for a
    /// byte of it, and is inaccessible until then (`lazy.rs` says how and why). Wired memory is
    /// refused (wiring would read everything up front).
    pub fn lazy(opts: &MemoryOptions, chunk_size: usize, source: Box<dyn ChunkSource>) -> Result<GuestMemory, MemoryError> {
        check_host_page_size()?;
        let mut specs = opts.layout()?;
        for spec in &mut specs {
            spec.lazy = true;
        }
        let tracking = if opts.tracking == TrackingChoice::Auto { TrackingChoice::Soft } else { opts.tracking };
        let mut mem = Self::build(&MemoryOptions { tracking, ..opts.clone() }, &specs)?;
        if opts.tracking == TrackingChoice::Auto {
            mem.fallback_reason = Some(LAZY_KERNEL_TRACKING_COST.to_string());
        }
        let image = Arc::new(LazyImage::new(&mem.segments, chunk_size, source)?);
        let mut offset = 0u64;
        for seg in &mem.segments {
            seg.set_lazy(image.clone(), offset);
            offset += seg.size() as u64;
        }
        let _ = mem.lazy.set(image);
        Ok(mem)
    }

    /// Make this memory lazy from now on: chunk `i` (of `chunk_size` bytes, lowmem then highmem)
    /// is loaded from `source` the first time anything asks for it if `needed(i)`, and is used as
    /// it is otherwise (`LazyImage::over_existing`). For a post-copy migration's destination at
    /// the switch: the guest must not be running. Refused for memory that is lazy already, closed,
    /// or viewed (a view would see the inaccessible chunks).
    pub fn make_lazy(&self, chunk_size: usize, source: Box<dyn ChunkSource>, needed: impl Fn(usize) -> bool) -> Result<(), MemoryError> {
        let refuse = |why: String| Err(MemoryError::Unsupported { what: "loading this guest memory on demand".into(), why });
        if self.lazy.get().is_some() {
            return refuse("it is loaded on demand already".into());
        }
        if self.kvm.is_some() {
            return refuse("it is a KVM guest's: its vCPU reaches it without asking for a chunk first".into());
        }
        if let Some(seg) = self.segments.iter().find(|s| s.is_closed()) {
            return Err(MemoryError::Closed { segment: seg.name().to_string() });
        }
        if let Some(seg) = self.segments.iter().find(|s| s.exports() > 0) {
            return refuse(format!("segment '{}' has {} exported view(s); release them first", seg.name(), seg.exports()));
        }
        self.stop_prefault();
        let image = Arc::new(LazyImage::over_existing(&self.segments, chunk_size, source, needed)?);
        let mut offset = 0u64;
        for seg in &self.segments {
            seg.set_lazy(image.clone(), offset);
            offset += seg.size() as u64;
        }
        let _ = self.lazy.set(image);
        Ok(())
    }

    fn build(opts: &MemoryOptions, specs: &[SegmentSpec]) -> Result<GuestMemory, MemoryError> {
        check_host_page_size()?;
        if opts.wired && opts.memsize > physical_memory() {
            return Err(MemoryError::BadSize {
                what: "wired guest memory".into(),
                size: opts.memsize,
                why: format!("cannot be wired: the host has {} of memory", human_size(physical_memory())),
            });
        }
        Self::build_from(opts, specs.iter().map(Segment::map).collect::<Result<Vec<_>, _>>()?)
    }

    /// Guest memory laid out as `opts` says, mapping the memfds `fds` (one per segment, lowmem
    /// first) that another process's memfd-backed memory handed over: the same pages, shared.
    /// Each descriptor's size is checked (fstat) against its segment; nothing is read or written.
    /// Dirty tracking starts clean (the caller marks what the other process had dirty).
    pub fn from_fds(opts: &MemoryOptions, fds: Vec<OwnedFd>) -> Result<GuestMemory, MemoryError> {
        check_host_page_size()?;
        let specs = MemoryOptions { backing: Backing::Memfd, ..opts.clone() }.layout()?;
        if fds.len() != specs.len() {
            let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
            return Err(MemoryError::Unsupported {
                what: format!("{} memory descriptor(s)", fds.len()),
                why: format!(
                    "do not match the layout of {} guest memory, which has {} segment(s) ({})",
                    human_size(opts.memsize),
                    specs.len(),
                    names.join(", ")
                ),
            });
        }
        let segments = specs.iter().zip(fds).map(|(spec, fd)| Segment::map_fd(spec, fd)).collect::<Result<Vec<_>, _>>()?;
        Self::build_from(&MemoryOptions { backing: Backing::Memfd, ..opts.clone() }, segments)
    }

    /// Guest memory of `memsize` bytes on KVM's dirty ring of `ring_bytes` per vCPU, without the
    /// check that this host's ring can be trusted (for that check itself: `kvm::ring_trusted`).
    pub(crate) fn kvm_ring_unchecked(memsize: u64, ring_bytes: u32) -> Result<GuestMemory, MemoryError> {
        check_host_page_size()?;
        let opts = MemoryOptions { tracking: TrackingChoice::KvmRing, ..MemoryOptions::new(memsize) };
        let mut segments = opts.layout()?.iter().map(Segment::map).collect::<Result<Vec<_>, _>>()?;
        let (backend, vm) = Self::kvm_slots(&mut segments, DirtyMode::Ring, ring_bytes)?;
        Ok(Self::assemble(&opts, segments, backend, None, Some(vm)))
    }

    fn build_from(opts: &MemoryOptions, mut segments: Vec<Segment>) -> Result<GuestMemory, MemoryError> {
        let (backend, fallback_reason, kvm) = match opts.tracking {
            TrackingChoice::Soft => (Backend::Soft, None, None),
            TrackingChoice::Kvm => {
                let (backend, vm) = Self::kvm_slots(&mut segments, DirtyMode::Bitmap, 0)?;
                (backend, None, Some(vm))
            }
            TrackingChoice::KvmRing => {
                crate::kvm::ring_trusted().map_err(|e| MemoryError::TrackerUnavailable { backend: "kvm-ring".into(), why: e.0 })?;
                let (backend, vm) = Self::kvm_slots(&mut segments, DirtyMode::Ring, crate::kvm::RING_BYTES)?;
                (backend, None, Some(vm))
            }
            TrackingChoice::Kernel | TrackingChoice::Auto => match kernel_logs(&segments) {
                Ok(logs) => {
                    for (seg, log) in segments.iter_mut().zip(logs) {
                        seg.set_dirty_log(Box::new(log));
                    }
                    (Backend::Kernel, None, None)
                }
                Err(why) if opts.tracking == TrackingChoice::Auto => (Backend::Soft, Some(why), None),
                Err(why) => return Err(MemoryError::TrackerUnavailable { backend: "kernel".into(), why }),
            },
        };
        Ok(Self::assemble(opts, segments, backend, fallback_reason, kvm))
    }

    /// Make the segments a new KVM VM's memory slots, each logged as `mode` says.
    fn kvm_slots(segments: &mut [Segment], mode: DirtyMode, ring_bytes: u32) -> Result<(Backend, Arc<KvmVm>), MemoryError> {
        let (backend, name) = if mode == DirtyMode::Ring { (Backend::KvmRing, "kvm-ring") } else { (Backend::Kvm, "kvm") };
        let unavailable = |why: String| MemoryError::TrackerUnavailable { backend: name.into(), why };
        let vm = Arc::new(KvmVm::open_with(mode, ring_bytes).map_err(|e| unavailable(e.0))?);
        for (slot, seg) in segments.iter_mut().enumerate() {
            // SAFETY: the slot is removed (close, Drop) before the segment is unmapped.
            let log = unsafe { vm.add_slot(slot as u32, seg.gpa().0, seg.as_ptr(), seg.size()) }
                .map_err(|e| unavailable(format!("segment '{}': {}", seg.name(), e.0)))?;
            seg.set_dirty_log(Box::new(log));
        }
        Ok((backend, vm))
    }

    fn assemble(
        opts: &MemoryOptions,
        segments: Vec<Segment>,
        backend: Backend,
        fallback_reason: Option<String>,
        kvm: Option<Arc<KvmVm>>,
    ) -> GuestMemory {
        let segments = segments.into_iter().map(Arc::new).collect();
        GuestMemory {
            segments,
            memsize: opts.memsize,
            lowmem_limit: opts.lowmem_limit,
            backend,
            fallback_reason,
            lazy: OnceLock::new(),
            kvm,
            prefault: Mutex::new(None),
        }
    }

    /// With the KVM backend: the KVM VM these segments are the memory slots of.
    pub fn kvm_vm(&self) -> Option<&Arc<KvmVm>> {
        self.kvm.as_ref()
    }

    /// Take the segments out of the KVM VM's memory slots, before they are unmapped.
    fn remove_kvm_slots(&self) {
        if let Some(vm) = &self.kvm {
            for (slot, seg) in self.segments.iter().enumerate() {
                vm.remove_slot(slot as u32, seg.gpa().0);
            }
        }
    }

    pub fn segments(&self) -> &[Arc<Segment>] {
        &self.segments
    }
    pub fn memsize(&self) -> u64 {
        self.memsize
    }
    /// The lowmem limit the layout was made with (lowmem ends at min(memsize, this)).
    pub fn lowmem_limit(&self) -> u64 {
        self.lowmem_limit
    }
    pub fn backend(&self) -> Backend {
        self.backend
    }
    /// What backs the memory (every segment has the same backing).
    pub fn backing(&self) -> Backing {
        self.segments[0].backing()
    }
    pub fn fallback_reason(&self) -> Option<&str> {
        self.fallback_reason.as_deref()
    }

    /// The chunk states of lazily restored memory; None for memory that was not.
    pub fn lazy_image(&self) -> Option<&Arc<LazyImage>> {
        self.lazy.get()
    }

    /// Whether every byte may be used without a check: memory that was not restored lazily, or
    /// whose every chunk has been loaded and checked.
    #[inline]
    pub fn is_complete(&self) -> bool {
        self.lazy.get().is_none_or(|image| image.is_complete())
    }

    /// Guest-physical bytes from 0 that may be used without a check: all of them (u64::MAX) unless
    /// lazily restored memory is still loading, then the loaded chunks from chunk 0 on (lowmem
    /// starts the image at GPA 0).
    #[inline]
    pub fn loaded_prefix(&self) -> u64 {
        match self.lazy.get() {
            Some(image) if !image.is_complete() => image.loaded_prefix(),
            _ => u64::MAX,
        }
    }

    /// Load and check every chunk of lazily restored memory not loaded yet (nothing for other
    /// memory): whole-memory readers (checkpoint, migration, digests) call it first.
    pub fn ensure_all(&self) -> Result<(), MemoryError> {
        match self.lazy.get() {
            None => Ok(()),
            Some(image) => image.ensure_all(),
        }
    }

    /// The segment holding `gpa..gpa+len` and the offset of `gpa` in it, ready to be read or
    /// written (for lazily restored memory, the chunks holding the range are loaded and checked).
    #[inline]
    pub fn translate(&self, gpa: GuestAddress, len: usize) -> Result<(&Arc<Segment>, usize), MemoryError> {
        for seg in &self.segments {
            if let Some(off) = seg.offset_of(gpa, len) {
                if seg.is_closed() {
                    return Err(MemoryError::Closed { segment: seg.name().to_string() });
                }
                seg.ensure(off, len)?;
                return Ok((seg, off));
            }
            if seg.contains(gpa) {
                let end = GuestAddress(seg.gpa().0 + seg.size() as u64);
                return Err(MemoryError::CrossesSegment { gpa, len: len as u64, segment: seg.name().to_string(), end });
            }
        }
        Err(MemoryError::Unmapped { gpa, len: len as u64 })
    }

    pub fn read(&self, gpa: GuestAddress, out: &mut [u8]) -> Result<(), MemoryError> {
        let (seg, off) = self.translate(gpa, out.len())?;
        // SAFETY: `translate` checked the range against the segment and made it accessible.
        unsafe { seg.read_unchecked(off, out) };
        Ok(())
    }

    pub fn write(&self, gpa: GuestAddress, data: &[u8]) -> Result<(), MemoryError> {
        let (seg, off) = self.translate(gpa, data.len())?;
        // SAFETY: `translate` checked the range against the segment and made it accessible.
        unsafe { seg.write_unchecked(off, data) };
        Ok(())
    }

    /// Write without marking dirty, for restore and migration receive (the guest is not running).
    pub fn write_untracked(&self, gpa: GuestAddress, data: &[u8]) -> Result<(), MemoryError> {
        let (seg, off) = self.translate(gpa, data.len())?;
        // SAFETY: `translate` checked the range against the segment and made it accessible.
        unsafe { seg.write_untracked_unchecked(off, data) };
        self.mark_clean_range(gpa, data.len())
    }

    /// Forget writes the backend saw by itself to the pages of `gpa..gpa+len`
    /// ([`forget_unmarked`](crate::dirty::DirtyLog::forget_unmarked)): for restore and receive
    /// paths that fill memory with read(2)/readv(2) or drop pages with madvise, which the kernel
    /// counts as writes. Marks are left alone (those paths never mark). Only for a guest that is
    /// not running: a guest write to the range meanwhile would be forgotten.
    pub fn mark_clean_range(&self, gpa: GuestAddress, len: usize) -> Result<(), MemoryError> {
        let (seg, off) = self.translate(gpa, len)?;
        seg.dirty_log().forget_unmarked(off / PAGE_SIZE, (off + len).div_ceil(PAGE_SIZE)).map_err(tracker_failed)
    }

    /// Harvest segment `index`'s dirty pages into `words` (bit i = page i of the segment; zeroed
    /// by the caller) and clear them ([`get_and_clear`](crate::dirty::DirtyLog::get_and_clear)).
    /// Returns the page count.
    pub fn get_and_clear_dirty_segment(&self, index: usize, words: &mut [u64]) -> Result<usize, MemoryError> {
        self.segments[index].dirty_log().get_and_clear(words).map_err(tracker_failed)
    }

    /// The dirty pages of segment `index` without clearing them
    /// ([`peek`](crate::dirty::DirtyLog::peek)).
    pub fn peek_dirty_segment(&self, index: usize, words: &mut [u64]) -> Result<(), MemoryError> {
        self.segments[index].dirty_log().peek(words).map_err(tracker_failed)
    }

    /// How many pages are dirty now in every segment, without clearing them.
    pub fn dirty_count(&self) -> Result<u64, MemoryError> {
        let mut total = 0;
        for seg in &self.segments {
            total += seg.dirty_log().count().map_err(tracker_failed)? as u64;
        }
        Ok(total)
    }

    /// Arm copy-before-write on every segment for a live snapshot ([`LiveCapture`]): the guest
    /// must be paused. Lazily restored memory must be loaded whole first ([`GuestMemory::ensure_all`]):
    /// a chunk loaded later would bypass the protection. Refused for memory in KVM slots.
    pub fn arm_live_capture(&self, limit_pages: usize) -> Result<LiveCapture, MemoryError> {
        if !self.is_complete() {
            return Err(MemoryError::Unsupported {
                what: "a live snapshot of lazily restored memory".into(),
                why: "needs every chunk loaded first (load_all)".into(),
            });
        }
        if self.kvm.is_some() {
            // KVM's vCPU stores reach memory through the host's page tables, never through
            // Segment::before_write, so no page could be copied out before the guest's write.
            return Err(MemoryError::Unsupported {
                what: "a live snapshot of a KVM guest".into(),
                why: "is not possible: the guest's own stores bypass the copy-before-write it needs; \
                      take the checkpoint without --live (the guest pauses while its memory is written)"
                    .into(),
            });
        }
        if let Some(seg) = self.segments.iter().find(|s| s.is_closed()) {
            return Err(MemoryError::Closed { segment: seg.name().to_string() });
        }
        LiveCapture::arm(&self.segments, limit_pages)
    }

    /// Start populating the segments that may be populated ahead (`prefault.rs`) on a thread,
    /// while a migration destination waits for its source. Returns the bytes it will populate
    /// (0: nothing to do here, and no thread). Refused while a population runs already, and
    /// where the host has not that much memory available beyond a reserve (then nothing is
    /// populated: a large guest that is mostly zero must not squeeze the host).
    pub fn start_prefault(&self) -> Result<u64, MemoryError> {
        let mut slot = self.prefault.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() {
            return Err(MemoryError::Unsupported { what: "guest memory".into(), why: "is being populated already".into() });
        }
        let kernel = self.backend == Backend::Kernel;
        let segments: Vec<Arc<Segment>> = self.segments.iter().filter(|s| prefault::eligible(s, kernel)).cloned().collect();
        let bytes: u64 = segments.iter().map(|s| s.size() as u64).sum();
        if bytes == 0 {
            return Ok(0);
        }
        let reserve = prefault::reserve();
        if let Some(available) = prefault::available_memory().filter(|&a| bytes.saturating_add(reserve) > a) {
            // Not a part of it either: the host would be squeezed for a guest that may well be
            // mostly zero, and the receive path does without.
            return Err(MemoryError::Unsupported {
                what: format!("populating {} of guest memory ahead", human_size(bytes)),
                why: format!(
                    "would leave the host less than {:.1} GiB of the {:.1} GiB it has available (/proc/meminfo MemAvailable)",
                    reserve as f64 / (1u64 << 30) as f64,
                    available as f64 / (1u64 << 30) as f64
                ),
            });
        }
        *slot = Some(Prefault::start(segments, reserve));
        Ok(bytes)
    }

    /// Stop a population [`GuestMemory::start_prefault`] began (waiting at most one step of it)
    /// and return what it did; None if none ran.
    pub fn stop_prefault(&self) -> Option<PrefaultStats> {
        let running = self.prefault.lock().unwrap_or_else(|e| e.into_inner()).take();
        running.map(Prefault::finish)
    }

    /// What wiring the memory did (`vmmrun -S`), summed over its segments: bytes populated in
    /// steps and how many of them on huge pages, seconds, the first step refused, and whether
    /// huge pages came cheaper (the last segment's verdict). None for unwired memory.
    pub fn wiring(&self) -> Option<PrefaultStats> {
        self.segments.iter().filter_map(|s| s.wiring()).reduce(PrefaultStats::merge)
    }

    /// Close every segment: refused while Python views exist, because they alias the mapping.
    pub fn close(&self) -> Result<(), (String, usize)> {
        for seg in &self.segments {
            if seg.exports() > 0 {
                return Err((seg.name().to_string(), seg.exports()));
            }
        }
        self.stop_prefault();
        if let Some(image) = self.lazy.get() {
            image.stop_loading();
        }
        self.remove_kvm_slots();
        for seg in &self.segments {
            seg.close();
        }
        Ok(())
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        self.remove_kvm_slots();
    }
}

/// One kernel dirty log per segment, all on one userfaultfd; or why the kernel backend cannot be had.
/// A registered segment receives pages on small ones: the kernel gives no transparent huge page
/// to a range registered for write-protection (measured: none at all), so advising would only
/// cost.
fn kernel_logs(segments: &[Segment]) -> Result<Vec<KernelLog>, String> {
    let tracker = Arc::new(KernelTracker::open().map_err(|e| e.0)?);
    let logs = segments
        .iter()
        .map(|seg| KernelLog::register(tracker.clone(), seg.as_ptr(), seg.size()).map_err(|e| format!("segment '{}': {}", seg.name(), e.0)))
        .collect::<Result<Vec<_>, _>>()?;
    for seg in segments {
        seg.bar_huge_receive();
    }
    Ok(logs)
}

fn tracker_failed(e: DirtyLogError) -> MemoryError {
    MemoryError::TrackerUnavailable { backend: e.backend.to_string(), why: e.why }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn layout_follows_bhyve() {
        let small = MemoryOptions::new(512 << 20).layout().unwrap();
        assert_eq!(small.len(), 1);
        assert_eq!((small[0].gpa, small[0].size), (GuestAddress(0), 512 << 20));
        let at = MemoryOptions::new(3 * GIB).layout().unwrap();
        assert_eq!(at.len(), 1);
        let above = MemoryOptions::new(5 * GIB).layout().unwrap();
        assert_eq!(above.len(), 2);
        assert_eq!((above[1].gpa, above[1].size), (GuestAddress(4 * GIB), 2 * GIB));
    }

    #[test]
    fn accesses_in_the_hole_and_across_the_end_are_refused() {
        let mut opts = MemoryOptions::new(8 << 20);
        opts.lowmem_limit = 4 << 20;
        let mem = GuestMemory::new(&opts).unwrap();
        let mut buf = [0u8; 16];
        assert!(matches!(mem.read(GuestAddress(5 << 20), &mut buf), Err(MemoryError::Unmapped { .. })));
        let err = mem.write(GuestAddress((4 << 20) - 8), &buf).unwrap_err();
        assert!(matches!(err, MemoryError::CrossesSegment { .. }), "{err}");
        assert!(err.to_string().contains("0x3ffff8"), "{err}");
        mem.write(GuestAddress(HIGHMEM_BASE + 100), b"hello").unwrap();
        let mut back = [0u8; 5];
        mem.read(GuestAddress(HIGHMEM_BASE + 100), &mut back).unwrap();
        assert_eq!(&back, b"hello");
    }

    #[test]
    fn writes_mark_exactly_their_pages() {
        let mem = GuestMemory::new(&MemoryOptions::new(1 << 20)).unwrap();
        mem.write(GuestAddress(4095), &[1, 2]).unwrap(); // straddles pages 0 and 1
        mem.write(GuestAddress(10 * 4096), &[0; 4096]).unwrap();
        mem.write_untracked(GuestAddress(20 * 4096), &[9; 8]).unwrap();
        let mut words = vec![0u64; 4];
        assert_eq!(mem.get_and_clear_dirty_segment(0, &mut words).unwrap(), 3);
        assert_eq!(words[0], 0b100_0000_0011);
        let mut again = vec![0u64; 4];
        assert_eq!(mem.get_and_clear_dirty_segment(0, &mut again).unwrap(), 0);
    }

    #[test]
    fn a_large_unwired_guest_costs_nothing_until_touched() {
        let mem = GuestMemory::new(&MemoryOptions::new(64 * GIB)).unwrap();
        assert_eq!(mem.segments().len(), 2);
        let resident = mem.segments()[1].resident().unwrap();
        assert_eq!(resident.iter().filter(|&&r| r).count(), 0);
    }
}
