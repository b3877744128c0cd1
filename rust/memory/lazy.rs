//! Memory restored lazily: anonymous memory whose contents arrive one chunk at a time, each chunk
//! checked before any byte of it can be seen.
//!
//! The image (lowmem, then highmem, back to back) is cut into fixed chunks. A chunk is loaded by
//! a [`ChunkSource`] (the checkpoint memory file: `snapshot` reads and hashes it) the first time
//! anything asks for a byte of it, and only a chunk whose source vouched for it (its hash
//! matched) becomes readable. A chunk that cannot be loaded stays unreadable for good, and every
//! access to it fails with [`MemoryError::ChunkUnavailable`] naming the source, the chunk's
//! guest-physical range and what was wrong.
//!
//! Why explicit checks and not userfaultfd. A userfaultfd MISSING handler would catch every access
//! path by itself, but a page fault cannot fail gracefully: when a chunk is bad, the faulting
//! thread can only be left blocked forever or be sent SIGBUS. A vCPU blocked in a fault can no
//! longer be paused; a Python thread blocked while holding the GIL (a device's DMA, a numpy view)
//! freezes the whole process, so nothing could stop the guest cleanly or remove its control
//! socket. It also needs /dev/userfaultfd (root or a sysctl), and a range can be registered with
//! only one userfaultfd, which the kernel dirty backend already uses. Explicit checks turn a bad
//! chunk into an ordinary error on every path: the vCPU's `run` fails, `read`/`write` (device DMA)
//! raise, a numpy view is refused. Each accessor asks [`LazyImage::ensure`] for the range it is
//! about to touch; once every chunk is loaded one atomic load says so, and the vCPU leaves its
//! lowmem fast path untouched in the first place (it only takes it once memory is complete).
//!
//! Defence in depth: chunks not yet loaded are mapped PROT_NONE, so an accessor that forgot to
//! ask would crash loudly instead of reading zeros where the file holds data. If the kernel
//! refuses the extra mappings that costs (vm.max_map_count), the segments are made accessible
//! whole and the explicit checks alone remain.
//!
//! The file is never mapped: loading is pread into anonymous memory, so a file truncated or
//! rewritten under a running guest makes the chunks not yet loaded fail their load (a short read,
//! a hash mismatch), and never faults the process. Chunks already loaded are the guest's own.
//!
//! Loading ahead ([`LazyImage::start_loading`]): background threads (no GIL) load a given list
//! of chunks first (the working set a previous restore recorded), then, if asked, every other
//! chunk in order, so the guest becomes fully resident soon. Each takes one chunk at a time
//! through the same load as any accessor (passing over a chunk someone is loading already), so
//! a chunk it finds bad fails exactly as a demand load would (and rings the notifier), and an
//! accessor needing another chunk loads it meanwhile in parallel: a chunk being loaded is
//! LOADING, and only a thread wanting that very chunk waits.
//!
//! Working-set recording: for a bounded time (or number of chunks) after the restore, every
//! access's chunks are noted in the order first touched, whoever loaded them. While recording,
//! the loaded prefix reads as empty and the image never reads as complete, so every access (the
//! vCPU's fast path too) passes through [`LazyImage::ensure`] and is seen.
//!
//! Statistics ([`LazyStats`]): loads by origin (demand, prefetch, fill), how long accessors
//! waited on loads (all, and in the first second), and when every chunk was loaded.
//!
//! This module owns the chunk states and the order of a load (unprotect, fill, check, publish).
//! It does not know files or hashes: the source does.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use super::address::PAGE_SIZE;
use super::error::MemoryError;
use super::segment::Segment;

/// One piece of guest memory a chunk's bytes go to: `len` bytes at `ptr`, the part of the chunk
/// from byte `chunk_offset`. A chunk has one part, or two where it spans lowmem and highmem.
#[derive(Clone, Copy, Debug)]
pub struct ChunkPart {
    pub ptr: *mut u8,
    pub len: usize,
    pub chunk_offset: usize,
}

/// Why a chunk could not be loaded, as the source saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChunkFault {
    /// The bytes do not hash to what was recorded.
    Mismatch,
    /// The source ended before the chunk did: `size` is how long it is now.
    Truncated { size: u64 },
    /// Reading failed: the errno and what the source says about it.
    Io { errno: i32, detail: String },
}

impl ChunkFault {
    fn errno(&self) -> i32 {
        match self {
            ChunkFault::Mismatch => libc::EBADMSG,
            ChunkFault::Truncated { .. } => libc::EIO,
            ChunkFault::Io { errno, .. } => *errno,
        }
    }

    fn describe(&self) -> String {
        match self {
            ChunkFault::Mismatch => "does not match its recorded hash".into(),
            ChunkFault::Truncated { size } => format!("cannot be read: the file was truncated to {size} bytes"),
            ChunkFault::Io { detail, .. } => format!("cannot be read: {detail}"),
        }
    }
}

/// Where a lazily restored image comes from.
pub trait ChunkSource: Send + Sync {
    /// What to call the source in errors, e.g. "checkpoint memory file 'vm0.ckp'".
    fn name(&self) -> &str;

    /// Fill chunk `index` (image bytes `index * chunk_size ..`, the last chunk short) into `parts`
    /// and check it. The parts are zero on entry and writable; bytes the source holds as zero
    /// (holes) may be left alone. Return `Ok` only if the whole chunk is what was recorded.
    ///
    /// # Safety
    /// The caller guarantees the parts are writable memory that nothing else reads or writes
    /// until this returns.
    unsafe fn load(&self, index: usize, parts: &[ChunkPart]) -> Result<(), ChunkFault>;

    /// [`Self::load`] for `origin`: a source may serve an accessor's demand before loading ahead
    /// (post-copy migration's page requests jump the background queue). The same contract.
    ///
    /// # Safety
    /// As [`Self::load`].
    unsafe fn load_for(&self, index: usize, parts: &[ChunkPart], origin: LoadOrigin) -> Result<(), ChunkFault> {
        let _ = origin;
        // SAFETY: the caller's contract, passed on.
        unsafe { self.load(index, parts) }
    }

    /// The image is going away ([`LazyImage::stop_loading`]): a load waiting for the source
    /// (a network link that is down) should give up now.
    fn stop(&self) {}
}

const UNLOADED: u8 = 0;
const LOADED: u8 = 1;
const FAILED: u8 = 2;
/// A thread is loading the chunk; others wanting it wait on `loaded_cv`.
const LOADING: u8 = 3;

/// Who asked for a chunk to be loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadOrigin {
    /// An accessor (a vCPU, a device, a bulk operation) needed a byte of it.
    Demand,
    /// A loading thread, from the working set it was given.
    Prefetch,
    /// The background fill, or a whole-memory reader ([`LazyImage::ensure_all`]).
    Fill,
}

/// What to load ahead and what to record, for [`LazyImage::start_loading`].
#[derive(Clone, Debug, Default)]
pub struct LoadPlan {
    /// Chunks to load first, in this order (indices past the end are skipped).
    pub prefetch: Vec<usize>,
    /// Then load every chunk not loaded yet, in order.
    pub fill: bool,
    /// Record the chunks accessed for this long (None: do not record)...
    pub record_for: Option<Duration>,
    /// ...or until this many distinct chunks were accessed.
    pub record_limit: usize,
    /// Threads loading ahead, each taking the next chunk of the order in turn (at least 1).
    pub loaders: usize,
    /// Fill from just past the chunk an accessor last had to wait for, instead of in order
    /// (locality: what a post-copy migration's guest touches next is likely near it).
    pub follow_demand: bool,
}

/// How a lazy restore went so far (see [`LazyImage::stats`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LazyStats {
    pub demand_loads: u64,
    pub prefetched: u64,
    pub filled: u64,
    /// Accesses that found a chunk not loaded and waited for it (loading it, or for the thread
    /// that was), and for how long in all, in the first second after loading ahead started
    /// (when the guest starts; none before it), and at most.
    pub waits: u64,
    pub wait: Duration,
    pub first_second_wait: Duration,
    pub max_wait: Duration,
    /// From that start to every chunk loaded; None until then.
    pub resident_after: Option<Duration>,
    /// Time since that start.
    pub elapsed: Duration,
    /// Whether accesses are being recorded now, and how many chunks were recorded.
    pub recording: bool,
    pub recorded: usize,
}

/// The first second after a restore: the window the fault-wait target speaks of.
const FIRST_SECOND: Duration = Duration::from_secs(1);

/// A segment's place in the image.
struct Member {
    segment: Weak<Segment>,
    image_offset: u64,
    size: usize,
    gpa: u64,
}

/// The chunk states of one lazily restored guest, shared by its segments.
pub struct LazyImage {
    source: Box<dyn ChunkSource>,
    chunk_size: usize,
    total: u64,
    states: Vec<AtomicU8>,
    /// Chunks neither loaded nor failed; `complete` once none are left and none failed.
    unloaded: AtomicUsize,
    complete: AtomicBool,
    /// How many chunks from chunk 0 on are all loaded: image bytes below `prefix * chunk_size`
    /// need no check (the vCPU's fast path covers them).
    prefix: AtomicUsize,
    members: Vec<Member>,
    /// Guards chunk state changes (UNLOADED -> LOADING -> LOADED/FAILED) and the prefix; a
    /// thread wanting a chunk another is loading waits on `loaded_cv`. Loads themselves run
    /// outside it, in parallel.
    state_lock: Mutex<()>,
    loaded_cv: Condvar,
    /// Every chunk that failed, with its error, in the order they failed.
    failures: Mutex<Vec<(usize, MemoryError)>>,
    /// Written to (one byte) when the first chunk fails.
    notify: Mutex<Option<OwnedFd>>,
    /// Unloaded chunks are PROT_NONE until loaded (false once that had to be given up).
    protected: AtomicBool,
    created: Instant,
    /// When loading ahead started (the guest starts right then): the origin of the statistics'
    /// times, `created` until then.
    started: std::sync::OnceLock<Instant>,
    /// Loads by origin: demand, prefetch, fill.
    loads: [AtomicU64; 3],
    waits: AtomicU64,
    wait_ns: AtomicU64,
    first_second_wait_ns: AtomicU64,
    max_wait_ns: AtomicU64,
    /// Nanoseconds from `created` to the last chunk loaded (0: not yet).
    resident_ns: AtomicU64,
    /// Accesses are being recorded: one bit per chunk in `touched`, and the order in `recorded`.
    recording: AtomicBool,
    record_limit: AtomicUsize,
    touched: Vec<AtomicU64>,
    recorded: Mutex<Vec<usize>>,
    /// The loading threads stop at their next chunk once this is set; `recording_done` is
    /// signalled when recording ends.
    stop: Mutex<bool>,
    stop_cv: Condvar,
    recording_done: Condvar,
    /// One past the chunk an accessor last loaded on demand (NO_HINT: none since a loader looked).
    demand_hint: AtomicUsize,
}

const NO_HINT: usize = usize::MAX;

impl LazyImage {
    /// Tie `segments` (in image order, freshly mapped inaccessible) to `source`. Every chunk starts
    /// unloaded.
    pub(super) fn new(segments: &[Arc<Segment>], chunk_size: usize, source: Box<dyn ChunkSource>) -> Result<LazyImage, MemoryError> {
        if chunk_size == 0 || !chunk_size.is_multiple_of(PAGE_SIZE) {
            return Err(MemoryError::BadSize {
                what: "lazy restore chunk size".into(),
                size: chunk_size as u64,
                why: "is not a positive multiple of 4 KiB".into(),
            });
        }
        let mut members = Vec::with_capacity(segments.len());
        let mut offset = 0u64;
        for seg in segments {
            members.push(Member { segment: Arc::downgrade(seg), image_offset: offset, size: seg.size(), gpa: seg.gpa().0 });
            offset += seg.size() as u64;
        }
        let chunks = offset.div_ceil(chunk_size as u64) as usize;
        Ok(LazyImage {
            source,
            chunk_size,
            total: offset,
            states: (0..chunks).map(|_| AtomicU8::new(UNLOADED)).collect(),
            unloaded: AtomicUsize::new(chunks),
            complete: AtomicBool::new(chunks == 0),
            prefix: AtomicUsize::new(0),
            members,
            state_lock: Mutex::new(()),
            loaded_cv: Condvar::new(),
            failures: Mutex::new(Vec::new()),
            notify: Mutex::new(None),
            protected: AtomicBool::new(true),
            created: Instant::now(),
            started: std::sync::OnceLock::new(),
            loads: Default::default(),
            waits: AtomicU64::new(0),
            wait_ns: AtomicU64::new(0),
            first_second_wait_ns: AtomicU64::new(0),
            max_wait_ns: AtomicU64::new(0),
            resident_ns: AtomicU64::new(0),
            recording: AtomicBool::new(false),
            record_limit: AtomicUsize::new(0),
            touched: (0..chunks.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            recorded: Mutex::new(Vec::new()),
            stop: Mutex::new(false),
            stop_cv: Condvar::new(),
            recording_done: Condvar::new(),
            demand_hint: AtomicUsize::new(NO_HINT),
        })
    }

    /// Tie `segments` (in image order), which already hold the image except the pages `needed`
    /// says, to `source`: chunk `i` is loaded from the source (filling only what it lacks) the
    /// first time anything asks for it if `needed(i)`, and is the guest's own as it is otherwise.
    /// The needed chunks are made inaccessible now (the guest must be paused, and nothing may hold
    /// a view of the segments). What a post-copy migration's destination does at the switch.
    pub(super) fn over_existing(
        segments: &[Arc<Segment>],
        chunk_size: usize,
        source: Box<dyn ChunkSource>,
        needed: impl Fn(usize) -> bool,
    ) -> Result<LazyImage, MemoryError> {
        let image = LazyImage::new(segments, chunk_size, source)?;
        let mut unloaded = 0;
        for (index, state) in image.states.iter().enumerate() {
            if needed(index) {
                unloaded += 1;
                continue;
            }
            state.store(LOADED, Ordering::Relaxed);
        }
        image.unloaded.store(unloaded, Ordering::Release);
        let prefix = image.states.iter().take_while(|s| s.load(Ordering::Relaxed) == LOADED).count();
        image.prefix.store(prefix, Ordering::Release);
        image.complete.store(unloaded == 0, Ordering::Release);
        if unloaded == 0 {
            image.resident_ns.store(1, Ordering::Release);
        }
        for index in (0..image.states.len()).filter(|&i| image.states[i].load(Ordering::Relaxed) == UNLOADED) {
            let (start, end) = image.chunk_range(index);
            for m in &image.members {
                let (a, b) = (start.max(m.image_offset), end.min(m.image_offset + m.size as u64));
                let Some(seg) = m.segment.upgrade().filter(|_| a < b) else { continue };
                // SAFETY: a page-aligned range inside a live mapping of ours; protection changes no bytes.
                let ptr = seg.as_ptr().wrapping_add((a - m.image_offset) as usize);
                if unsafe { libc::mprotect(ptr as *mut libc::c_void, (b - a) as usize, libc::PROT_NONE) } != 0 {
                    // Too many mappings (vm.max_map_count): open everything again, keep the checks.
                    image.open_all()?;
                    return Ok(image);
                }
            }
        }
        Ok(image)
    }

    pub fn chunk_size(&self) -> usize {
        self.chunk_size
    }
    pub fn chunks(&self) -> usize {
        self.states.len()
    }
    pub fn source_name(&self) -> &str {
        self.source.name()
    }

    /// Every chunk is loaded and checked: nothing will ever need a check again.
    #[inline]
    pub fn is_complete(&self) -> bool {
        self.complete.load(Ordering::Acquire)
    }

    /// Image bytes from offset 0 that are all loaded and checked and may be used without asking
    /// (none while accesses are recorded).
    #[inline]
    pub fn loaded_prefix(&self) -> u64 {
        if self.recording.load(Ordering::Acquire) {
            return 0;
        }
        (self.prefix.load(Ordering::Acquire) as u64 * self.chunk_size as u64).min(self.total)
    }

    /// Every chunk is loaded and checked (the image may still read as not complete while
    /// accesses are recorded).
    pub fn is_resident(&self) -> bool {
        self.resident_ns.load(Ordering::Acquire) != 0
    }

    /// (loaded, failed) chunk counts.
    pub fn counts(&self) -> (usize, usize) {
        let failed = self.failures.lock().unwrap_or_else(|p| p.into_inner()).len();
        (self.states.len().saturating_sub(self.unloaded.load(Ordering::Acquire) + failed), failed)
    }

    /// The first chunk that failed, if any.
    pub fn first_failure(&self) -> Option<MemoryError> {
        self.failures.lock().unwrap_or_else(|p| p.into_inner()).first().map(|(_, e)| e.clone())
    }

    /// Write one byte to `fd` (a duplicate is kept) when the first chunk fails, or now if one has.
    pub fn notify_on_failure(&self, fd: OwnedFd) {
        // Under the notifier's lock: a load that fails meanwhile records its failure before it
        // takes this lock, so it is seen here or finds the new fd, never neither.
        let mut notify = self.notify.lock().unwrap_or_else(|p| p.into_inner());
        if !self.failures.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
            poke(&fd);
        }
        *notify = Some(fd);
    }

    /// Make image bytes `offset..offset+len` readable, loading and checking the chunks that hold
    /// them; the error of the first chunk that cannot be.
    #[inline]
    pub fn ensure(&self, offset: u64, len: usize) -> Result<(), MemoryError> {
        if self.is_complete() {
            return Ok(());
        }
        self.ensure_slow(offset, len)
    }

    #[inline(never)]
    fn ensure_slow(&self, offset: u64, len: usize) -> Result<(), MemoryError> {
        if len == 0 || offset >= self.total {
            return Ok(());
        }
        let first = (offset / self.chunk_size as u64) as usize;
        let last = ((offset + len as u64 - 1).min(self.total - 1) / self.chunk_size as u64) as usize;
        if self.recording.load(Ordering::Acquire) {
            self.record(first, last);
        }
        let mut waiting_since = None;
        let mut result = Ok(());
        for index in first..=last {
            if self.states[index].load(Ordering::Acquire) != LOADED {
                waiting_since.get_or_insert_with(Instant::now);
                if let Err(err) = self.load(index, LoadOrigin::Demand) {
                    result = Err(err);
                    break;
                }
                self.demand_hint.store(index + 1, Ordering::Relaxed);
            }
        }
        if let Some(since) = waiting_since {
            self.count_wait(since);
        }
        result
    }

    fn count_wait(&self, since: Instant) {
        let ns = since.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        self.waits.fetch_add(1, Ordering::Relaxed);
        self.wait_ns.fetch_add(ns, Ordering::Relaxed);
        self.max_wait_ns.fetch_max(ns, Ordering::Relaxed);
        // Waits before loading ahead started are the restore's own (a diff applied over the
        // image), not the guest's first second.
        if self.started.get().is_some_and(|&started| since.saturating_duration_since(started) < FIRST_SECOND) {
            self.first_second_wait_ns.fetch_add(ns, Ordering::Relaxed);
        }
    }

    /// Note chunks `first..=last` as accessed, in the order first seen, up to the limit.
    fn record(&self, first: usize, last: usize) {
        for index in first..=last {
            let (word, bit) = (&self.touched[index / 64], 1u64 << (index % 64));
            if word.load(Ordering::Relaxed) & bit != 0 || word.fetch_or(bit, Ordering::AcqRel) & bit != 0 {
                continue;
            }
            let mut recorded = self.recorded.lock().unwrap_or_else(|p| p.into_inner());
            if recorded.len() < self.record_limit.load(Ordering::Relaxed) {
                recorded.push(index);
            }
            if recorded.len() >= self.record_limit.load(Ordering::Relaxed) {
                drop(recorded);
                self.stop_recording();
                return;
            }
        }
    }

    /// Load every chunk not loaded yet (counted as filled: a whole-memory reader, not a wait of
    /// the guest's); the first error.
    pub fn ensure_all(&self) -> Result<(), MemoryError> {
        if self.is_complete() {
            return Ok(());
        }
        for index in 0..self.states.len() {
            if self.states[index].load(Ordering::Acquire) != LOADED {
                self.load(index, LoadOrigin::Fill)?;
            }
        }
        Ok(())
    }

    /// Start `plan.loaders` background threads that load `plan.prefetch`, then (with
    /// `plan.fill`) every other chunk, and record accesses as `plan` says. Once per image; later
    /// calls are refused. The threads stop at the first chunk that fails (the failure is recorded and the notifier
    /// rung, as for any load), when the memory is dropped or closed, or on [`Self::stop_loading`].
    pub fn start_loading(self: &Arc<Self>, plan: LoadPlan) -> Result<(), MemoryError> {
        if self.record_limit.swap(plan.record_limit.max(1), Ordering::AcqRel) != 0 {
            return Err(MemoryError::Unsupported {
                what: "loading ahead".into(),
                why: "was already started for this lazily restored memory".into(),
            });
        }
        let now = *self.started.get_or_init(Instant::now);
        let record_until = plan.record_for.map(|d| now + d);
        if record_until.is_some() {
            self.recording.store(true, Ordering::Release);
        }
        let fill = if plan.fill { 0..self.states.len() } else { 0..0 };
        let order: Arc<Vec<(usize, LoadOrigin)>> =
            Arc::new(plan.prefetch.iter().map(|&i| (i, LoadOrigin::Prefetch)).chain(fill.map(|i| (i, LoadOrigin::Fill))).collect());
        let cursor = Arc::new(AtomicUsize::new(0));
        for n in 0..plan.loaders.max(1) {
            let (image, order, cursor) = (self.clone(), order.clone(), cursor.clone());
            let record_until = if n == 0 { record_until } else { None };
            let follow = plan.follow_demand;
            std::thread::Builder::new()
                .name(format!("lazy-fill-{n}"))
                .spawn(move || {
                    if follow {
                        image.run_follower(&order, &cursor);
                    }
                    image.run_loader(&order, &cursor, record_until)
                })
                .map_err(|e| MemoryError::Unsupported {
                    what: "the lazy restore's loading thread".into(),
                    why: format!("cannot start: {e}"),
                })?;
        }
        Ok(())
    }

    /// Stop the loading threads at their next chunk, and recording now.
    pub fn stop_loading(&self) {
        *self.stop.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.stop_cv.notify_all();
        self.source.stop();
        self.stop_recording();
    }

    fn stopped(&self) -> bool {
        *self.stop.lock().unwrap_or_else(|p| p.into_inner())
            || self.members.iter().any(|m| m.segment.upgrade().is_none_or(|s| s.is_closed()))
    }

    /// Take the next chunk of `order` (shared by every loader through `cursor`) until none is
    /// left; a chunk another thread is loading or has loaded is passed over, not waited for.
    fn run_loader(&self, order: &[(usize, LoadOrigin)], cursor: &AtomicUsize, record_until: Option<Instant>) {
        while let Some(&(index, origin)) = order.get(cursor.fetch_add(1, Ordering::Relaxed)) {
            if index >= self.states.len() || self.states[index].load(Ordering::Acquire) != UNLOADED {
                continue;
            }
            if self.stopped() || self.first_failure().is_some() || self.load(index, origin).is_err() {
                break;
            }
        }
        if let Some(until) = record_until {
            let mut stop = self.stop.lock().unwrap_or_else(|p| p.into_inner());
            // Woken by stop_loading; otherwise a look every 50 ms whether the memory is gone.
            while !*stop && self.recording.load(Ordering::Acquire) {
                let now = Instant::now();
                if now >= until {
                    break;
                }
                stop = self.stop_cv.wait_timeout(stop, (until - now).min(Duration::from_millis(50))).unwrap_or_else(|p| p.into_inner()).0;
                if self.members.iter().any(|m| m.segment.upgrade().is_none_or(|s| s.is_closed())) {
                    break;
                }
            }
            self.stop_recording();
        }
    }

    /// Load the chunks of `order` first, then every chunk not loaded, starting just past the one
    /// an accessor last waited for whenever one did (and in order from there otherwise), until
    /// none is left; leaves `cursor` past the end of `order`.
    fn run_follower(&self, order: &[(usize, LoadOrigin)], cursor: &AtomicUsize) {
        while let Some(&(index, origin)) = order.get(cursor.fetch_add(1, Ordering::Relaxed)) {
            if index < self.states.len()
                && self.states[index].load(Ordering::Acquire) == UNLOADED
                && self.try_load_ahead(index, origin).is_err()
            {
                return;
            }
        }
        let chunks = self.states.len();
        let mut next = 0;
        let mut passed = 0; // chunks looked at since one was found unloaded
        while passed < chunks {
            let hint = self.demand_hint.swap(NO_HINT, Ordering::Relaxed);
            if hint != NO_HINT {
                (next, passed) = (hint % chunks.max(1), 0);
            }
            let index = next;
            next = (next + 1) % chunks;
            if self.states[index].load(Ordering::Acquire) != UNLOADED {
                passed += 1;
                continue;
            }
            passed = 0;
            if self.try_load_ahead(index, LoadOrigin::Fill).is_err() {
                return;
            }
        }
    }

    /// One chunk loaded ahead; Err when loading ahead must stop (stopped, or a chunk failed).
    fn try_load_ahead(&self, index: usize, origin: LoadOrigin) -> Result<(), ()> {
        if self.stopped() || self.first_failure().is_some() || self.load(index, origin).is_err() {
            return Err(());
        }
        Ok(())
    }

    /// End recording: from now on the loaded prefix and completeness read as they are.
    fn stop_recording(&self) {
        let _state = self.state_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.recording.store(false, Ordering::Release);
        if self.unloaded.load(Ordering::Acquire) == 0 && self.first_failure().is_none() {
            self.complete.store(true, Ordering::Release);
        }
        self.recording_done.notify_all();
    }

    /// The chunks recorded, in the order first accessed, once recording has ended; None if it
    /// is still going after `timeout` (or never started).
    pub fn wait_recorded(&self, timeout: Duration) -> Option<Vec<usize>> {
        let deadline = Instant::now() + timeout;
        let mut state = self.state_lock.lock().unwrap_or_else(|p| p.into_inner());
        while self.recording.load(Ordering::Acquire) {
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            state = self.recording_done.wait_timeout(state, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
        drop(state);
        if self.record_limit.load(Ordering::Acquire) == 0 {
            return None;
        }
        Some(self.recorded.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }

    /// Where the statistics' times count from: the start of loading ahead, else the restore.
    fn origin(&self) -> Instant {
        *self.started.get().unwrap_or(&self.created)
    }

    /// How the restore went so far (times from [`Self::start_loading`], or the restore).
    pub fn stats(&self) -> LazyStats {
        let ns = |a: &AtomicU64| Duration::from_nanos(a.load(Ordering::Relaxed));
        let resident = self.resident_ns.load(Ordering::Acquire);
        LazyStats {
            demand_loads: self.loads[0].load(Ordering::Relaxed),
            prefetched: self.loads[1].load(Ordering::Relaxed),
            filled: self.loads[2].load(Ordering::Relaxed),
            waits: self.waits.load(Ordering::Relaxed),
            wait: ns(&self.wait_ns),
            first_second_wait: ns(&self.first_second_wait_ns),
            max_wait: ns(&self.max_wait_ns),
            resident_after: (resident != 0).then(|| Duration::from_nanos(resident)),
            elapsed: Instant::now().saturating_duration_since(self.origin()),
            recording: self.recording.load(Ordering::Acquire),
            recorded: self.recorded.lock().unwrap_or_else(|p| p.into_inner()).len(),
        }
    }

    fn chunk_range(&self, index: usize) -> (u64, u64) {
        let start = index as u64 * self.chunk_size as u64;
        (start, (start + self.chunk_size as u64).min(self.total))
    }

    /// The guest-physical ranges image bytes `start..end` hold.
    fn gpa_ranges(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        self.members
            .iter()
            .filter_map(|m| {
                let (a, b) = (start.max(m.image_offset), end.min(m.image_offset + m.size as u64));
                (a < b).then(|| (m.gpa + (a - m.image_offset), m.gpa + (b - m.image_offset)))
            })
            .collect()
    }

    /// Load chunk `index` unless it is loaded (Ok) or failed (its error); if another thread is
    /// loading it, wait for that one.
    fn load(&self, index: usize, origin: LoadOrigin) -> Result<(), MemoryError> {
        {
            let mut state = self.state_lock.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                match self.states[index].load(Ordering::Acquire) {
                    LOADED => return Ok(()),
                    FAILED => return Err(self.failure_of(index)),
                    LOADING => state = self.loaded_cv.wait(state).unwrap_or_else(|p| p.into_inner()),
                    _ => break,
                }
            }
            self.states[index].store(LOADING, Ordering::Release);
        }
        let result = self.load_claimed(index, origin);
        let _state = self.state_lock.lock().unwrap_or_else(|p| p.into_inner());
        match &result {
            Ok(true) => {
                self.states[index].store(LOADED, Ordering::Release);
                self.loads[origin as usize].fetch_add(1, Ordering::Relaxed);
                let mut prefix = self.prefix.load(Ordering::Acquire);
                while prefix < self.states.len() && self.states[prefix].load(Ordering::Acquire) == LOADED {
                    prefix += 1;
                }
                self.prefix.store(prefix, Ordering::Release);
                if self.unloaded.fetch_sub(1, Ordering::AcqRel) == 1 && self.first_failure().is_none() {
                    let ns = Instant::now().saturating_duration_since(self.origin()).as_nanos().clamp(1, u64::MAX as u128) as u64;
                    self.resident_ns.store(ns, Ordering::Release);
                    if !self.recording.load(Ordering::Acquire) {
                        self.complete.store(true, Ordering::Release);
                    }
                }
            }
            Ok(false) => {
                self.unloaded.fetch_sub(1, Ordering::AcqRel);
                self.states[index].store(FAILED, Ordering::Release);
            }
            Err(_) => self.states[index].store(UNLOADED, Ordering::Release), // the memory is going away
        }
        self.loaded_cv.notify_all();
        match result {
            Ok(true) => Ok(()),
            Ok(false) => Err(self.failure_of(index)),
            Err(err) => Err(err),
        }
    }

    /// Fill and check chunk `index`, which this thread marked LOADING: Ok(true) if it is good,
    /// Ok(false) if it failed (recorded, the notifier rung), Err if the memory is gone.
    fn load_claimed(&self, index: usize, origin: LoadOrigin) -> Result<bool, MemoryError> {
        let (start, end) = self.chunk_range(index);
        // The segments stay mapped while we hold them; if one is gone the guest is being torn down.
        let mut held = Vec::with_capacity(2);
        let mut parts = Vec::with_capacity(2);
        for m in &self.members {
            let (a, b) = (start.max(m.image_offset), end.min(m.image_offset + m.size as u64));
            if a >= b {
                continue;
            }
            let seg = m.segment.upgrade().ok_or_else(|| MemoryError::Closed { segment: "of a lazily restored guest".into() })?;
            let off = (a - m.image_offset) as usize;
            parts.push(ChunkPart { ptr: seg.as_ptr().wrapping_add(off), len: (b - a) as usize, chunk_offset: (a - start) as usize });
            held.push((seg, off));
        }
        self.open_parts(&parts)?;
        // SAFETY: the parts lie inside mappings `held` keeps alive, were just made writable, and
        // no accessor touches them: every one asks `ensure` first, which waits while the chunk is
        // LOADING (this thread alone moved it there).
        let result = unsafe { self.source.load_for(index, &parts, origin) };
        match result {
            Ok(()) => {
                // pread into the mapping counts as a write to the kernel dirty backend.
                for ((seg, off), p) in held.iter().zip(&parts) {
                    let _ = seg.dirty_log().forget_unmarked(off / PAGE_SIZE, (off + p.len).div_ceil(PAGE_SIZE));
                }
                Ok(true)
            }
            Err(fault) => {
                self.discard_parts(&parts);
                let err = MemoryError::ChunkUnavailable {
                    source: self.source.name().to_string(),
                    chunk: index,
                    file_start: start,
                    file_end: end,
                    gpa_ranges: self.gpa_ranges(start, end),
                    why: fault.describe(),
                    errno: fault.errno(),
                };
                let first = {
                    let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
                    failures.push((index, err));
                    failures.len() == 1
                };
                if first {
                    if let Some(fd) = self.notify.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                        poke(fd);
                    }
                }
                Ok(false)
            }
        }
    }

    fn failure_of(&self, index: usize) -> MemoryError {
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures.iter().find(|(i, _)| *i == index).map(|(_, e)| e.clone()).expect("a failed chunk has its error recorded")
    }

    /// Make the parts writable. If the kernel refuses (each protected range is a mapping of its
    /// own and vm.max_map_count caps them), open every segment whole and stop protecting.
    fn open_parts(&self, parts: &[ChunkPart]) -> Result<(), MemoryError> {
        if !self.protected.load(Ordering::Acquire) {
            return Ok(());
        }
        // SAFETY: each part lies inside a live mapping of ours; protection changes no bytes.
        let refused =
            parts.iter().any(|p| unsafe { libc::mprotect(p.ptr as *mut libc::c_void, p.len, libc::PROT_READ | libc::PROT_WRITE) } != 0);
        if !refused {
            return Ok(());
        }
        self.open_all()
    }

    /// Make every segment accessible whole and stop protecting (the explicit checks remain).
    fn open_all(&self) -> Result<(), MemoryError> {
        for m in &self.members {
            if let Some(seg) = m.segment.upgrade() {
                // SAFETY: the whole mapping of a live segment.
                if unsafe { libc::mprotect(seg.as_ptr() as *mut libc::c_void, seg.size(), libc::PROT_READ | libc::PROT_WRITE) } != 0 {
                    return Err(MemoryError::os(
                        format!("cannot make lazily restored segment '{}' accessible", seg.name()),
                        "mprotect failed",
                    ));
                }
            }
        }
        self.protected.store(false, Ordering::Release);
        Ok(())
    }

    /// Throw away what a failed load wrote and make the parts inaccessible again.
    fn discard_parts(&self, parts: &[ChunkPart]) {
        for p in parts {
            // SAFETY: each part lies inside a live mapping of ours that no accessor reads (the
            // chunk is not loaded). MADV_REMOVE frees a memfd's pages (MADV_DONTNEED would only
            // unmap them here); private anonymous memory refuses it, and MADV_DONTNEED makes its
            // pages zero again.
            unsafe {
                if libc::madvise(p.ptr as *mut libc::c_void, p.len, libc::MADV_REMOVE) != 0 {
                    libc::madvise(p.ptr as *mut libc::c_void, p.len, libc::MADV_DONTNEED);
                }
                if self.protected.load(Ordering::Acquire) {
                    libc::mprotect(p.ptr as *mut libc::c_void, p.len, libc::PROT_NONE);
                }
            }
        }
    }
}

fn poke(fd: &OwnedFd) {
    // SAFETY: a one-byte write from a local; a full pipe or a closed reader is fine to ignore.
    unsafe { libc::write(fd.as_raw_fd(), b"!".as_ptr() as *const libc::c_void, 1) };
}
