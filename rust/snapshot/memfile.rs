//! Writing guest memory to the memory file and reading it back.
//!
//! Writing walks each segment once: pages mincore calls never touched, and pages that are all
//! zero, are not written (the file keeps a hole there); runs of adjacent data pages go out in
//! one pwrite straight from guest memory. The same pass feeds the chunk hasher, so the hashes
//! cost no second read. Reading finds the file's data with SEEK_DATA/SEEK_HOLE and preads only
//! that, so holes cost nothing, a piece at a time into a staging buffer that stays in the cache;
//! it hashes the piece there, puts it in place with non-temporal stores, and compares every
//! chunk before it reports success. Pages it fills are not dirty: the soft bitmap is never set
//! and the kernel backend's protection is restored.
//!
//! Both run with the guest stopped: a page changed during a write is saved at some moment and
//! its chunk hash may disagree, which a later verification would report.

use std::os::fd::RawFd;
use std::time::Instant;

use super::chunks::ChunkHasher;
use super::error::SnapshotError;
use super::image::ImageLayout;
use super::pagecache::{is_cold, CachePolicy, CacheRelease, ReleaseBehind};
use crate::digest::{each_page_ahead, is_zero_page, resident_bitmap};
use crate::memory::{
    interrupted, page_bytes_mut, populate_steps, stream_pages, zeroed_pages, GuestAddress, GuestMemory, MemoryError, PageChooser, Segment,
    PAGE_SIZE,
};
use crate::progress::{self, Meter};

/// A restore reads the file in pieces of this size, each hashed right after it lands: small
/// enough that the piece is still in the core's L2 cache for the hash (1-2 MiB on current x86
/// cores), large enough that the syscalls cost about 1 %. With 8 MiB pieces the hash ran from L3
/// at a third of the speed: an eager restore of 1 GiB took 0.43-0.48 s against 0.30-0.34 s (A/B
/// on one host; docs/performance.md, session 24).
const READ_PIECE: usize = 256 << 10;

/// An eager restore asks whether the process was interrupted (`memory::set_interrupt_check`:
/// Ctrl-C, on the main thread) after each this many bytes read: a large guest's read takes
/// seconds, and Ctrl-C should not wait for all of it (a few milliseconds here, as wiring's).
const INTERRUPT_BYTES: u64 = 64 << 20;

/// A checkpoint writes guest memory in pieces of this size, each hashed right before it is
/// written. Nothing gained from smaller ones (checkpoint to tmpfs 1.46-1.48 GiB/s with 256 KiB
/// against 1.57-1.61 with 8 MiB, session 24), and an O_DIRECT write waits for the device each
/// time: fewer, larger ones keep it busy.
const WRITE_PIECE: usize = 8 << 20;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct WriteStats {
    /// Bytes handed to pwrite (data pages only).
    pub bytes_written: u64,
    pub data_pages: u64,
    /// Pages that were touched but hold only zeros: not written.
    pub zero_pages: u64,
    /// Pages never touched (mincore): neither read nor written.
    pub untouched_pages: u64,
    pub pwrite_calls: u64,
    /// The file's logical size: lowmem + highmem.
    pub file_size: u64,
    pub chunk_size: u64,
    pub chunk_hashes: Vec<u128>,
    pub seconds: f64,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReadStats {
    /// Bytes read from the file's data extents.
    pub bytes_read: u64,
    /// Bytes the file does not store (holes), which cost nothing.
    pub hole_bytes: u64,
    pub data_extents: u64,
    /// Bytes read once the restore had decided to drop what it reads from the page cache (all of
    /// them for a file that was cold, none for one found cached or kept: `pagecache.rs`). The
    /// kernel keeps dirty pages and pages in use whatever it is asked.
    pub cache_released: u64,
    /// Whether chunk hashes were computed and compared (all matched, or this is an error).
    pub verified: bool,
    pub chunk_hashes: Vec<u128>,
    pub seconds: f64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum PageKind {
    Untouched,
    Zero,
    Data,
}

pub(super) fn check_chunk_size(chunk_size: u64) -> Result<usize, SnapshotError> {
    if chunk_size == 0 || !chunk_size.is_multiple_of(PAGE_SIZE as u64) || usize::try_from(chunk_size).is_err() {
        return Err(SnapshotError::BadChunkSize { chunk_size });
    }
    Ok(chunk_size as usize)
}

/// Visit pages `first..end` of `seg` as runs of one kind, in order. Pages not set in `resident`
/// are Untouched (not read); with `detect_zero` the others are read and split Zero/Data, without
/// it they are all Data.
fn page_runs<E>(
    seg: &Segment,
    resident: &[u64],
    first: usize,
    end: usize,
    detect_zero: bool,
    mut visit: impl FnMut(PageKind, usize, usize) -> Result<(), E>,
) -> Result<(), E> {
    let touched = |p: usize| resident[p / 64] >> (p % 64) & 1 != 0;
    // is_zero_page only fails for a page outside the segment, which `end <= pages` rules out.
    let kind_of = |p: usize| {
        if !touched(p) {
            PageKind::Untouched
        } else if detect_zero && is_zero_page(seg, p as u64).unwrap_or(false) {
            PageKind::Zero
        } else {
            PageKind::Data
        }
    };
    if first >= end {
        return Ok(());
    }
    let mut run_start = first;
    let mut run_kind = kind_of(first);
    let mut page = first + 1;
    while page < end {
        if run_kind == PageKind::Untouched && page.is_multiple_of(64) && page + 64 <= end && resident[page / 64] == 0 {
            page += 64; // a whole word of untouched pages
            continue;
        }
        let kind = kind_of(page);
        if kind != run_kind {
            visit(run_kind, run_start, page - run_start)?;
            run_start = page;
            run_kind = kind;
        }
        page += 1;
    }
    visit(run_kind, run_start, end - run_start)
}

/// The bytes at `off..off+len` of `seg`.
///
/// # Safety
/// The range must lie inside the mapping, which lives as long as `seg`; the guest must be
/// stopped or the bytes are a moment's snapshot (the hasher only reads each byte once).
unsafe fn guest_bytes(seg: &Segment, off: usize, len: usize) -> &[u8] {
    debug_assert!(off + len <= seg.size());
    // SAFETY: see the function's contract.
    unsafe { std::slice::from_raw_parts(seg.as_ptr().add(off), len) }
}

pub(super) fn pwrite_all(fd: RawFd, mut ptr: *const u8, mut len: usize, mut offset: u64, gpa: u64) -> Result<u64, SnapshotError> {
    let mut calls = 0;
    while len > 0 {
        // SAFETY: the caller hands a range inside a live mapping; pwrite only reads it.
        let n = unsafe { libc::pwrite(fd, ptr as *const libc::c_void, len, offset as libc::off_t) };
        calls += 1;
        if n < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(SnapshotError::io(format!("writing the memory file at offset {offset:#x} (guest-physical {gpa:#x}, {len} bytes)")));
        }
        if n == 0 {
            return Err(SnapshotError::Io {
                what: format!("writing the memory file at offset {offset:#x}"),
                source: std::io::ErrorKind::WriteZero.into(),
            });
        }
        let n = n as usize;
        ptr = ptr.wrapping_add(n);
        len -= n;
        offset += n as u64;
    }
    Ok(calls)
}

/// Fill `len` bytes at `ptr` from the file at `offset`; an early end of file is an error.
///
/// # Safety
/// `ptr..ptr+len` must be writable memory that no Rust reference points into (guest memory).
pub(super) unsafe fn pread_all(fd: RawFd, mut ptr: *mut u8, mut len: usize, mut offset: u64) -> Result<(), SnapshotError> {
    while len > 0 {
        // SAFETY: the caller's contract.
        let n = unsafe { libc::pread(fd, ptr as *mut libc::c_void, len, offset as libc::off_t) };
        if n < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(SnapshotError::io(format!("reading the memory file at offset {offset:#x}")));
        }
        if n == 0 {
            return Err(SnapshotError::Io {
                what: format!(
                    "reading the memory file at offset {offset:#x}: the file ended {len} bytes early (was it changed while being read?)"
                ),
                source: std::io::ErrorKind::UnexpectedEof.into(),
            });
        }
        let n = n as usize;
        ptr = ptr.wrapping_add(n);
        len -= n;
        offset += n as u64;
    }
    Ok(())
}

pub(super) fn file_stat(fd: RawFd, what: &str) -> Result<libc::stat, SnapshotError> {
    // SAFETY: fstat writes into the struct we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(SnapshotError::io(format!("{what}: fstat of fd {fd}")));
    }
    Ok(st)
}

/// Feed the image of `layout` to `hasher` the way a writer sees it, calling `on_data` for every
/// data run (segment, offset, length, file offset) after hashing it, and advancing `meter` by
/// each run (a piece at a time for data). Returns (data, zero, untouched) page counts.
fn walk_image(
    layout: &ImageLayout,
    hasher: &mut ChunkHasher,
    meter: Option<&Meter>,
    mut on_data: impl FnMut(&Segment, usize, usize, u64) -> Result<(), SnapshotError>,
) -> Result<(u64, u64, u64), SnapshotError> {
    let (mut data, mut zero, mut untouched) = (0u64, 0u64, 0u64);
    for (seg, file_off) in layout.segments() {
        let (resident, _) = resident_bitmap(seg)?;
        page_runs(seg, &resident, 0, seg.pages(), true, |kind, first, count| {
            let bytes = count * PAGE_SIZE;
            match kind {
                PageKind::Untouched => {
                    untouched += count as u64;
                    hasher.zeros(bytes as u64);
                    progress::advance(meter, count as u64, 0, 0);
                }
                PageKind::Zero => {
                    zero += count as u64;
                    hasher.zeros(bytes as u64);
                    progress::advance(meter, count as u64, 0, 0);
                }
                PageKind::Data => {
                    data += count as u64;
                    let mut off = first * PAGE_SIZE;
                    let end = off + bytes;
                    while off < end {
                        let len = WRITE_PIECE.min(end - off);
                        // SAFETY: page_runs stays inside the segment's pages.
                        let piece = unsafe { guest_bytes(seg, off, len) };
                        // The piece's first read, from memory: a page at a time with the next
                        // ones asked for; the write below then copies it from the caches.
                        each_page_ahead(piece.as_ptr(), len / PAGE_SIZE, |i| hasher.data(&piece[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]));
                        on_data(seg, off, len, file_off + off as u64)?;
                        let pages = (len / PAGE_SIZE) as u64;
                        progress::advance(meter, pages, pages, len as u64);
                        off += len;
                    }
                }
            }
            Ok::<(), SnapshotError>(())
        })?;
    }
    Ok((data, zero, untouched))
}

/// Write guest memory to `fd` (a regular file, truncated first) as the checkpoint memory image,
/// sparse: never-touched and all-zero pages are left as holes. Returns what was written and the
/// xxh3-128 hash of every `chunk_size` chunk of the image. `meter`, when given, is told the
/// image's pages first and advances as they are written or skipped (bytes: those written).
pub fn write_memory_file(mem: &GuestMemory, fd: RawFd, chunk_size: u64, meter: Option<&Meter>) -> Result<WriteStats, SnapshotError> {
    let started = Instant::now();
    let chunk = check_chunk_size(chunk_size)?;
    let layout = ImageLayout::of(mem)?;
    let st = file_stat(fd, "writing the memory file")?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(SnapshotError::Unsupported {
            why: format!("the memory file (fd {fd}) must be a regular file, so holes can stand for zero pages"),
        });
    }
    // Lazily restored memory is loaded and checked whole first: nothing is saved that was not
    // verified, and nothing is left needing the file it came from (which may be this one).
    mem.ensure_all()?;
    let total = layout.total();
    // Truncate to nothing first: pages we skip must read as holes, never as an old file's bytes.
    // SAFETY: ftruncate has no memory effects.
    if unsafe { libc::ftruncate(fd, 0) } != 0 || unsafe { libc::ftruncate(fd, total as libc::off_t) } != 0 {
        return Err(SnapshotError::io(format!("sizing the memory file to {total} bytes")));
    }
    let mut hasher = ChunkHasher::new(chunk, total);
    if let Some(m) = meter {
        m.add_total(total / PAGE_SIZE as u64, 0);
    }
    let (mut written, mut calls) = (0u64, 0u64);
    let (data, zero, untouched) = walk_image(&layout, &mut hasher, meter, |seg, off, len, file_off| {
        // SAFETY-relevant: the pointer is inside the segment (walk_image stays inside it).
        calls += pwrite_all(fd, seg.as_ptr().wrapping_add(off), len, file_off, seg.gpa().0 + off as u64)?;
        written += len as u64;
        Ok(())
    })?;
    Ok(WriteStats {
        bytes_written: written,
        data_pages: data,
        zero_pages: zero,
        untouched_pages: untouched,
        pwrite_calls: calls,
        file_size: total,
        chunk_size,
        chunk_hashes: hasher.finish(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The chunk hashes of guest memory as it is now, in image order: what `write_memory_file` would
/// record. Untouched pages are hashed as zeros without being read.
pub fn memory_chunk_hashes(mem: &GuestMemory, chunk_size: u64) -> Result<Vec<u128>, SnapshotError> {
    let chunk = check_chunk_size(chunk_size)?;
    let layout = ImageLayout::of(mem)?;
    mem.ensure_all()?;
    let mut hasher = ChunkHasher::new(chunk, layout.total());
    walk_image(&layout, &mut hasher, None, |_, _, _, _| Ok(()))?;
    Ok(hasher.finish())
}

/// The chunk hashes of a memory file on disk, reading only its data extents (holes hash as
/// zeros). Returns the hashes and the file's size. This reads the whole file's data: it is how a
/// lazily restored checkpoint is verified, separately from the restore itself.
pub fn hash_memory_file(fd: RawFd, chunk_size: u64) -> Result<(Vec<u128>, u64), SnapshotError> {
    let chunk = check_chunk_size(chunk_size)?;
    let size = file_stat(fd, "hashing the memory file")?.st_size as u64;
    let extents =
        file_data_extents(fd, 0, size).map_err(|e| SnapshotError::Io { what: "finding the data in the memory file".into(), source: e })?;
    let mut hasher = ChunkHasher::new(chunk, size);
    let mut buf = vec![0u8; READ_PIECE];
    let mut pos = 0;
    for (start, end) in extents {
        hasher.zeros(start - pos);
        let mut off = start;
        while off < end {
            let len = (READ_PIECE as u64).min(end - off) as usize;
            // SAFETY: `buf` is ours and at least `len` bytes long.
            unsafe { pread_all(fd, buf.as_mut_ptr(), len, off)? };
            hasher.data(&buf[..len]);
            off += len as u64;
        }
        pos = end;
    }
    hasher.zeros(size - pos);
    Ok((hasher.finish(), size))
}

/// Whether a restore of the memory file at `fd` would bring it in from the disk (fewer than half
/// of the data the filesystem holds for it cached, `pagecache.rs`): what a caller that reads the
/// file first, to verify it, asks before that read, and then passes on as `CachePolicy::Release`
/// or `Keep`. One fstat, and one cachestat, which costs in proportion to the pages cached (none
/// on tmpfs, where it is not asked).
pub fn memory_file_is_cold(fd: RawFd) -> Result<bool, SnapshotError> {
    let st = file_stat(fd, "the memory file")?;
    Ok(is_cold(fd, allocated_bytes(&st)))
}

/// The bytes the filesystem holds for a file (its blocks, at most its size): what reading it
/// all would bring into the page cache, known without walking its extents.
pub(super) fn allocated_bytes(st: &libc::stat) -> u64 {
    (st.st_blocks as u64).saturating_mul(512).min(st.st_size as u64)
}

/// The file's data extents inside `start..end` (page-aligned), rounded out to whole pages and
/// merged, so everything between them is whole pages of hole.
pub(super) fn page_extents(fd: RawFd, start: u64, end: u64) -> Result<Vec<(u64, u64)>, SnapshotError> {
    let page = PAGE_SIZE as u64;
    let raw = file_data_extents(fd, start, end)
        .map_err(|e| SnapshotError::Io { what: "finding the data in the memory file (SEEK_DATA)".into(), source: e })?;
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(raw.len());
    for (s, e) in raw {
        let (s, e) = (s / page * page, e.div_ceil(page).saturating_mul(page).min(end));
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    Ok(out)
}

/// Read the memory file at `fd` into `mem`, which must be fresh anonymous memory of the same
/// layout (just created, nothing written). Only the file's data extents are read; holes are left
/// as the zero pages they already are. Pages are not marked dirty.
///
/// With `verify = Some((hashes, chunk_size))` every chunk is hashed as it is read (the bytes
/// then put in place) and compared; a mismatch is an error naming the first bad chunk and its
/// guest-physical range, and the caller must discard `mem`: nothing is reported restored until
/// every chunk has matched. Holes are hashed as memory holds them (pages resident before the
/// call are read), so memory that was not fresh fails the check instead of passing with stale
/// bytes. `meter`, when
/// given, is told the image's pages (and the file's data pages) first and advances as each piece
/// is read and each hole passed.
pub fn read_memory_file(
    mem: &GuestMemory,
    fd: RawFd,
    verify: Option<(&[u128], u64)>,
    meter: Option<&Meter>,
) -> Result<ReadStats, SnapshotError> {
    read_memory_file_cached(mem, fd, verify, meter, CachePolicy::Auto)
}

/// [`read_memory_file`] with what it does to the page cache it reads through (`pagecache.rs`):
/// `Auto` drops what it read from a file it found cold, `Release` from any, `Keep` never.
pub fn read_memory_file_cached(
    mem: &GuestMemory,
    fd: RawFd,
    verify: Option<(&[u128], u64)>,
    meter: Option<&Meter>,
    cache: CachePolicy,
) -> Result<ReadStats, SnapshotError> {
    let started = Instant::now();
    let layout = ImageLayout::of(mem)?;
    if let Some((seg, _)) = layout.segments().find(|(s, _)| s.lazy_image().is_some()) {
        return Err(SnapshotError::Unsupported {
            why: format!("segment '{}' is restored lazily; eager restore reads into fresh anonymous memory", seg.name()),
        });
    }
    let total = layout.total();
    let size = file_stat(fd, "reading the memory file")?.st_size as u64;
    if size != total {
        return Err(SnapshotError::FileSize { size, expected: total });
    }
    let mut hasher = match verify {
        Some((hashes, chunk_size)) => {
            let chunk = check_chunk_size(chunk_size)?;
            let expected = total.div_ceil(chunk_size) as usize;
            if hashes.len() != expected {
                return Err(SnapshotError::ChunkCount { got: hashes.len(), expected, chunk_size });
            }
            Some(ChunkHasher::new(chunk, total))
        }
        None => None,
    };
    // Residency before anything is read: which hole pages must be hashed from memory.
    let resident: Vec<Vec<u64>> = if hasher.is_some() {
        layout.segments().map(|(s, _)| resident_bitmap(s).map(|r| r.0)).collect::<Result<_, _>>()?
    } else {
        Vec::new()
    };
    let extents = page_extents(fd, 0, total)?;
    let mut stats = ReadStats { data_extents: extents.len() as u64, ..Default::default() };
    let page = PAGE_SIZE as u64;
    let data_bytes: u64 = extents.iter().map(|(s, e)| e - s).sum();
    if let Some(m) = meter {
        m.add_total(total / page, data_bytes / page);
    }
    let mut behind = ReleaseBehind::new(CacheRelease::new(fd, cache, || is_cold(fd, data_bytes)));

    let hash_hole = |hasher: &mut ChunkHasher, start: u64, end: u64| -> Result<(), SnapshotError> {
        layout.for_each_part(start, end, |seg, off, len| {
            let index = layout.segments().position(|(s, _)| std::sync::Arc::ptr_eq(s, seg)).unwrap();
            page_runs(seg, &resident[index], off / PAGE_SIZE, (off + len) / PAGE_SIZE, false, |kind, first, count| {
                match kind {
                    // SAFETY: page_runs stays inside the segment's pages.
                    PageKind::Data => hasher.data(unsafe { guest_bytes(seg, first * PAGE_SIZE, count * PAGE_SIZE) }),
                    _ => hasher.zeros((count * PAGE_SIZE) as u64),
                }
                Ok::<(), SnapshotError>(())
            })
        })
    };

    // First touch of fresh anonymous memory (allocating and zeroing each page) costs as much as
    // the read itself on some hosts: a second thread populates the data extents ahead of the
    // reader (MADV_POPULATE_WRITE, Linux 5.14+; advisory, failures ignored), so pread mostly
    // fills pages that already exist. It touches only pages the reader fills anyway, 2 MiB at a
    // time, each whole region on huge pages or small ones, whichever it times cheaper (as a
    // migration destination's population does: `memory::PageChooser`). Wired memory is
    // populated already.
    let populate = !mem.segments().iter().any(|s| s.wired());
    // Each piece is read into a staging buffer that stays in the cache, hashed there and put in
    // place with non-temporal stores (`stream_pages`): a read straight into guest memory would
    // read every line of it before writing it. A/B in docs/performance.md (session 27).
    let mut staging = zeroed_pages(READ_PIECE / PAGE_SIZE);
    // Set once the reader is done, however it ended: the populating thread stops then.
    let stop = &std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| -> Result<(), SnapshotError> {
        if populate {
            let (layout, extents) = (&layout, &extents);
            scope.spawn(move || {
                let mut chooser = PageChooser::default();
                for &(start, end) in extents {
                    let _ = layout.for_each_part::<()>(start, end, |seg, seg_off, len| {
                        // for_each_part keeps each step inside the segment's mapping. A refused
                        // step ends this part: the reader faults the rest in itself.
                        for (off, step) in populate_steps(seg, seg_off, len) {
                            if stop.load(std::sync::atomic::Ordering::Relaxed) || chooser.populate_step(seg, off, step).is_err() {
                                break;
                            }
                        }
                        Ok(())
                    });
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        return;
                    }
                }
            });
        }
        // However the read ends (done, failed, interrupted or panicking), the populating thread
        // stops before the scope waits for it: what it would still populate is read or unused.
        let _stop_populating = SetOnDrop(stop);
        let mut pos = 0u64;
        let mut unchecked = 0u64;
        for &(start, end) in &extents {
            stats.hole_bytes += start - pos;
            if let Some(h) = hasher.as_mut() {
                hash_hole(h, pos, start)?;
            }
            progress::advance(meter, (start - pos) / page, 0, 0);
            let mut off = start;
            while off < end {
                let piece_end = (off + READ_PIECE as u64).min(end);
                let piece = &mut page_bytes_mut(&mut staging)[..(piece_end - off) as usize];
                // SAFETY: `piece` is writable memory of its length, borrowed mutably for the call.
                unsafe { pread_all(fd, piece.as_mut_ptr(), piece.len(), off)? };
                if let Some(h) = hasher.as_mut() {
                    h.data(piece);
                }
                let mut at = 0;
                layout.for_each_part(off, piece_end, |seg, seg_off, len| {
                    seg.before_write(seg_off, len);
                    // SAFETY: for_each_part keeps `seg_off..seg_off+len` inside the segment's mapping
                    // (page-aligned, as the piece is); guest memory is never behind a Rust
                    // reference, and the guest is not running.
                    unsafe { stream_pages(seg.as_ptr().add(seg_off), &piece[at..at + len]) };
                    at += len;
                    Ok::<(), SnapshotError>(())
                })?;
                stats.bytes_read += piece_end - off;
                behind.read_up_to(piece_end, piece_end - off);
                progress::advance(meter, (piece_end - off) / page, (piece_end - off) / page, piece_end - off);
                unchecked += piece_end - off;
                off = piece_end;
                if unchecked >= INTERRUPT_BYTES {
                    unchecked = 0;
                    if interrupted() {
                        let what = format!(
                            "reading {} of memory from the checkpoint was interrupted after {}",
                            about(data_bytes),
                            about(stats.bytes_read)
                        );
                        return Err(SnapshotError::Memory(MemoryError::Interrupted { what }));
                    }
                }
            }
            pos = end;
        }
        stats.hole_bytes += total - pos;
        if let Some(h) = hasher.as_mut() {
            hash_hole(h, pos, total)?;
        }
        progress::advance(meter, (total - pos) / page, 0, 0);
        Ok(())
    })?;
    stats.cache_released = behind.released;
    // The rest of the file leaves the cache now, not after the checks below.
    drop(behind);
    // The stores into the mapping count as writes to the kernel backend: forget those.
    for (seg, _) in layout.segments() {
        mem.mark_clean_range(GuestAddress(seg.gpa().0), seg.size())?;
    }
    if let (Some(h), Some((expected, chunk_size))) = (hasher, verify) {
        let got = h.finish();
        let bad: Vec<usize> = got.iter().zip(expected).enumerate().filter(|(_, (a, b))| a != b).map(|(i, _)| i).collect();
        if let Some(&index) = bad.first() {
            let file_start = index as u64 * chunk_size;
            let file_end = (file_start + chunk_size).min(total);
            return Err(SnapshotError::ChunkMismatch {
                index,
                file_start,
                file_end,
                gpa_ranges: layout.gpa_ranges(file_start, file_end),
                mismatches: bad.len(),
            });
        }
        stats.chunk_hashes = got;
        stats.verified = true;
    }
    stats.seconds = started.elapsed().as_secs_f64();
    Ok(stats)
}

/// Sets its flag when dropped, on the way out of a scope whether it returns or unwinds.
struct SetOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// "2 GiB", "1.9 GiB", "511.8 MiB": a size in the largest unit it reaches, to a tenth where it
/// is not whole (`human_size` would say 2095108 KiB).
fn about(bytes: u64) -> String {
    for (unit, scale) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        // 1 GiB less a page is "1.0 GiB", not "1024.0 MiB".
        if (bytes as f64 / scale as f64 * 10.0).round() >= 10.0 {
            return match bytes.is_multiple_of(scale) {
                true => format!("{} {unit}", bytes / scale),
                false => format!("{:.1} {unit}", bytes as f64 / scale as f64),
            };
        }
    }
    format!("{bytes} B")
}

/// The data extents `(start, end)` of the file at `fd` within `start..end`, from
/// SEEK_DATA/SEEK_HOLE. Filesystems without hole support report one extent for everything.
pub(super) fn file_data_extents(fd: RawFd, start: u64, end: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        let Some((data, hole)) = next_data_extent(fd, pos, end)? else { break };
        let hole = hole.min(end);
        out.push((data, hole));
        pos = hole;
    }
    Ok(out)
}

/// The first data extent of the file at `fd` that starts in `pos..end` (SEEK_DATA, then
/// SEEK_HOLE; the extent may run past `end`), or None where only holes lie there.
pub(super) fn next_data_extent(fd: RawFd, pos: u64, end: u64) -> std::io::Result<Option<(u64, u64)>> {
    // SAFETY: lseek has no memory effects; a bad fd is an error return.
    let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
    if data < 0 {
        let err = std::io::Error::last_os_error();
        return if err.raw_os_error() == Some(libc::ENXIO) { Ok(None) } else { Err(err) };
    }
    if data as u64 >= end {
        return Ok(None);
    }
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
    if hole < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Some((data as u64, hole as u64)))
}
