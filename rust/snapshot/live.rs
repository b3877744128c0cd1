//! Writing the memory file of a live snapshot: guest memory as it was when a
//! [`LiveCapture`] was armed, while the guest runs on and writes to it.
//!
//! The file is the same as [`write_memory_file`](super::write_memory_file)'s (same image, same
//! holes for untouched and all-zero pages, same chunk hashes): pages are taken from the capture
//! in image order, a buffer at a time, into a page-aligned buffer (so O_DIRECT works), then
//! hashed and written from there. Taking copies each page once under the capture's lock, so the
//! guest's writes never wait on the disk, only on that copy (and on the side store's limit).

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::chunks::ChunkHasher;
use super::error::SnapshotError;
use super::image::ImageLayout;
use super::memfile::{check_chunk_size, file_stat, pwrite_all, WriteStats};
use crate::digest::{is_zero_raw, swap_active};
use crate::memory::{page_bytes_mut, zeroed_pages, GuestMemory, LiveCapture, TakenPage, PAGE_SIZE};
use crate::progress::{self, Meter};

/// Pages taken under the capture's lock at once: short enough that a guest write waits at most
/// one 256 KiB copy.
const TAKE_PAGES: usize = 64;
/// Pages hashed and written per pwrite batch (4 MiB).
const BUFFER_PAGES: usize = 1024;

/// Lifts the capture however the write ends.
struct Lift<'a>(&'a LiveCapture);

impl Drop for Lift<'_> {
    fn drop(&mut self) {
        self.0.finish();
    }
}

/// Write the memory as `capture` holds it to `fd` (a regular file, truncated first), as
/// [`write_memory_file`](super::write_memory_file) would have with the guest stopped at the
/// moment it was armed. `cancel`, once set, stops the write with an error at the next buffer.
/// The capture is lifted when this returns, whatever the outcome ([`LiveCapture::stats`] then
/// says what copy-before-write did).
pub fn write_memory_file_live(
    mem: &GuestMemory,
    capture: &LiveCapture,
    fd: RawFd,
    chunk_size: u64,
    meter: Option<&Meter>,
    cancel: &AtomicBool,
) -> Result<WriteStats, SnapshotError> {
    let _lift = Lift(capture);
    let started = Instant::now();
    let chunk = check_chunk_size(chunk_size)?;
    let layout = ImageLayout::of(mem)?;
    if capture.segments().len() != layout.segments().count()
        || capture.segments().iter().zip(layout.segments()).any(|(a, (b, _))| !std::sync::Arc::ptr_eq(a, b))
    {
        return Err(SnapshotError::Unsupported { why: "the live snapshot's capture was armed on another guest's memory".into() });
    }
    let st = file_stat(fd, "writing the memory file")?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(SnapshotError::Unsupported {
            why: format!("the memory file (fd {fd}) must be a regular file, so holes can stand for zero pages"),
        });
    }
    let total = layout.total();
    // Empty first (pages skipped must read as holes, never as an old file's bytes); sized at
    // the end, so a file that stops short of its data is short, never the right size.
    // SAFETY: ftruncate has no memory effects.
    if unsafe { libc::ftruncate(fd, 0) } != 0 {
        return Err(SnapshotError::io("emptying the memory file"));
    }
    let mut hasher = ChunkHasher::new(chunk, total);
    if let Some(m) = meter {
        m.add_total(total / PAGE_SIZE as u64, 0);
    }
    let all_resident = swap_active(); // mincore cannot tell swapped pages from untouched ones
    let mut buffer = zeroed_pages(BUFFER_PAGES);
    let out = page_bytes_mut(&mut buffer);
    let mut kinds = vec![TakenPage::Untouched; BUFFER_PAGES];
    let mut mincore = vec![0u8; BUFFER_PAGES];
    let mut resident = vec![false; BUFFER_PAGES];
    let mut stats = WriteStats { file_size: total, chunk_size, ..WriteStats::default() };
    for (index, (seg, file_off)) in layout.segments().enumerate() {
        let mut first = 0;
        while first < seg.pages() {
            if cancel.load(Ordering::Relaxed) {
                return Err(SnapshotError::Cancelled);
            }
            let n = BUFFER_PAGES.min(seg.pages() - first);
            if all_resident {
                resident[..n].fill(true);
            } else {
                // SAFETY: pages first..first+n lie inside the mapping `seg` keeps alive; `mincore`
                // has a byte per page asked about.
                let at = unsafe { seg.as_ptr().add(first * PAGE_SIZE) };
                if unsafe { libc::mincore(at as *mut libc::c_void, n * PAGE_SIZE, mincore.as_mut_ptr()) } != 0 {
                    return Err(SnapshotError::io(format!("mincore on segment '{}'", seg.name())));
                }
                for (r, m) in resident[..n].iter_mut().zip(&mincore[..n]) {
                    *r = m & 1 != 0;
                }
            }
            let mut at = 0;
            while at < n {
                let m = TAKE_PAGES.min(n - at);
                capture.take(
                    index,
                    first + at,
                    &resident[at..at + m],
                    &mut out[at * PAGE_SIZE..(at + m) * PAGE_SIZE],
                    &mut kinds[at..at + m],
                )?;
                at += m;
            }
            let (data_before, bytes_before) = (stats.data_pages, stats.bytes_written);
            let place = (file_off + (first * PAGE_SIZE) as u64, seg.gpa().0 + (first * PAGE_SIZE) as u64);
            write_buffer(fd, &out[..n * PAGE_SIZE], &kinds[..n], place, &mut hasher, &mut stats)?;
            progress::advance(meter, n as u64, stats.data_pages - data_before, stats.bytes_written - bytes_before);
            first += n;
        }
    }
    // SAFETY: ftruncate has no memory effects.
    if unsafe { libc::ftruncate(fd, total as libc::off_t) } != 0 {
        return Err(SnapshotError::io(format!("sizing the memory file to {total} bytes")));
    }
    stats.chunk_hashes = hasher.finish();
    stats.seconds = started.elapsed().as_secs_f64();
    Ok(stats)
}

/// Hash `pages` (taken as `kinds` say) in order and write their runs of data pages at `file_off`
/// (`gpa` is where the first page lies in the guest, for errors).
fn write_buffer(
    fd: RawFd,
    pages: &[u8],
    kinds: &[TakenPage],
    (file_off, gpa): (u64, u64),
    hasher: &mut ChunkHasher,
    stats: &mut WriteStats,
) -> Result<(), SnapshotError> {
    let is_data = |i: usize| {
        // SAFETY: page i lies inside `pages`.
        kinds[i] != TakenPage::Untouched && !unsafe { is_zero_raw(pages.as_ptr().add(i * PAGE_SIZE), PAGE_SIZE) }
    };
    let mut i = 0;
    while i < kinds.len() {
        let data = is_data(i);
        let mut end = i + 1;
        while end < kinds.len() && is_data(end) == data {
            end += 1;
        }
        let bytes = &pages[i * PAGE_SIZE..end * PAGE_SIZE];
        if data {
            hasher.data(bytes);
            let skip = (i * PAGE_SIZE) as u64;
            stats.pwrite_calls += pwrite_all(fd, bytes.as_ptr(), bytes.len(), file_off + skip, gpa + skip)?;
            stats.bytes_written += bytes.len() as u64;
            stats.data_pages += (end - i) as u64;
        } else {
            hasher.zeros(bytes.len() as u64);
            for kind in &kinds[i..end] {
                if *kind == TakenPage::Untouched {
                    stats.untouched_pages += 1;
                } else {
                    stats.zero_pages += 1;
                }
            }
        }
        i = end;
    }
    Ok(())
}
