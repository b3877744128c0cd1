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
//! This module owns the chunk states and the order of a load (unprotect, fill, check, publish).
//! It does not know files or hashes: the source does.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

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
}

const UNLOADED: u8 = 0;
const LOADED: u8 = 1;
const FAILED: u8 = 2;

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
    /// Loads run one at a time: a second thread wanting the same chunk waits for the first.
    load_lock: Mutex<()>,
    /// Every chunk that failed, with its error, in the order they failed.
    failures: Mutex<Vec<(usize, MemoryError)>>,
    /// Written to (one byte) when the first chunk fails.
    notify: Mutex<Option<OwnedFd>>,
    /// Unloaded chunks are PROT_NONE until loaded (false once that had to be given up).
    protected: AtomicBool,
}

impl LazyImage {
    /// Tie `segments` (in image order, freshly mapped inaccessible) to `source`. Every chunk starts
    /// unloaded.
    pub(super) fn new(segments: &[Arc<Segment>], chunk_size: usize, source: Box<dyn ChunkSource>) -> Result<LazyImage, MemoryError> {
        if chunk_size == 0 || chunk_size % PAGE_SIZE != 0 {
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
            load_lock: Mutex::new(()),
            failures: Mutex::new(Vec::new()),
            notify: Mutex::new(None),
            protected: AtomicBool::new(true),
        })
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

    /// Image bytes from offset 0 that are all loaded and checked (only grows).
    #[inline]
    pub fn loaded_prefix(&self) -> u64 {
        (self.prefix.load(Ordering::Acquire) as u64 * self.chunk_size as u64).min(self.total)
    }

    /// (loaded, failed) chunk counts.
    pub fn counts(&self) -> (usize, usize) {
        let failed = self.failures.lock().unwrap_or_else(|p| p.into_inner()).len();
        (self.states.len() - self.unloaded.load(Ordering::Acquire) - failed, failed)
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
        for index in first..=last {
            if self.states[index].load(Ordering::Acquire) != LOADED {
                self.load(index)?;
            }
        }
        Ok(())
    }

    /// Load every chunk not loaded yet; the first error.
    pub fn ensure_all(&self) -> Result<(), MemoryError> {
        self.ensure(0, usize::try_from(self.total).unwrap_or(usize::MAX))
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

    fn load(&self, index: usize) -> Result<(), MemoryError> {
        let _guard = self.load_lock.lock().unwrap_or_else(|p| p.into_inner());
        match self.states[index].load(Ordering::Acquire) {
            LOADED => return Ok(()),
            FAILED => return Err(self.failure_of(index)),
            _ => {}
        }
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
        // no accessor touches them: every one asks `ensure` first, which waits on `load_lock`.
        let result = unsafe { self.source.load(index, &parts) };
        match result {
            Ok(()) => {
                // pread into the mapping counts as a write to the kernel dirty backend.
                for ((seg, off), p) in held.iter().zip(&parts) {
                    let _ = seg.dirty_log().forget_unmarked(off / PAGE_SIZE, (off + p.len).div_ceil(PAGE_SIZE));
                }
                self.states[index].store(LOADED, Ordering::Release);
                let mut prefix = self.prefix.load(Ordering::Acquire);
                while prefix < self.states.len() && self.states[prefix].load(Ordering::Acquire) == LOADED {
                    prefix += 1;
                }
                self.prefix.store(prefix, Ordering::Release);
                if self.unloaded.fetch_sub(1, Ordering::AcqRel) == 1 && self.first_failure().is_none() {
                    self.complete.store(true, Ordering::Release);
                }
                Ok(())
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
                self.unloaded.fetch_sub(1, Ordering::AcqRel);
                let first = {
                    let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
                    failures.push((index, err.clone()));
                    failures.len() == 1
                };
                self.states[index].store(FAILED, Ordering::Release);
                if first {
                    if let Some(fd) = self.notify.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                        poke(fd);
                    }
                }
                Err(err)
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
