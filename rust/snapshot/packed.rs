//! A diff checkpoint's memory file: the pages of given runs of the image, packed back to back
//! (the file's offsets are not the guest's; the `.meta` lists the runs).
//!
//! The pages go out straight from guest memory in pwritev batches of up to `BATCH` bytes (page-
//! aligned buffers and offsets, so an O_DIRECT descriptor works), while a second thread hashes the
//! same bytes into the packed file's chunk hashes: the hashes cost no read of the file, and the
//! hashing overlaps the writing. The guest must be stopped (a page changed meanwhile would be
//! saved at some moment and its hash might disagree, which a verification reports).

use std::os::fd::RawFd;
use std::time::Instant;

use super::chunks::ChunkHasher;
use super::error::SnapshotError;
use super::memfile::{check_chunk_size, pwrite_all};
use crate::memory::{GuestMemory, PAGE_SIZE};

/// One pwritev moves at most this many bytes (and `IOV_MAX` pieces).
const BATCH: usize = 16 << 20;
const IOV_MAX: usize = 1024;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct PackedStats {
    pub bytes_written: u64,
    pub pwrite_calls: u64,
    /// The packed file's chunk hashes (its size is `bytes_written`).
    pub chunk_hashes: Vec<u128>,
    pub seconds: f64,
}

/// A piece of guest memory to write: its address, length and guest-physical address (for errors).
#[derive(Clone, Copy)]
struct Piece {
    addr: usize,
    len: usize,
    gpa: u64,
}

/// Write the image pages of `runs` (`(first page, count)`, ascending, image order: lowmem then
/// highmem) packed into `fd` from offset 0, hashing them in `chunk_size` chunks as they go.
/// Lazily restored memory has the needed chunks loaded first.
pub fn write_packed_pages(mem: &GuestMemory, fd: RawFd, runs: &[(u64, u64)], chunk_size: u64) -> Result<PackedStats, SnapshotError> {
    let chunk = check_chunk_size(chunk_size)?;
    let started = Instant::now();
    let pieces = pieces_of(mem, runs)?;
    let total: u64 = pieces.iter().map(|p| p.len as u64).sum();
    let (calls, hashes) = std::thread::scope(|scope| {
        let hasher = scope.spawn(|| {
            let mut hasher = ChunkHasher::new(chunk, total);
            for p in &pieces {
                // SAFETY: each piece lies inside a live segment of `mem` (checked and loaded by
                // `pieces_of`), which outlives this scope; the bytes are only read.
                hasher.data(unsafe { std::slice::from_raw_parts(p.addr as *const u8, p.len) });
            }
            hasher.finish()
        });
        let written = write_pieces(fd, &pieces);
        let hashes = hasher.join().expect("the hashing thread does not panic");
        written.map(|calls| (calls, hashes))
    })?;
    Ok(PackedStats { bytes_written: total, pwrite_calls: calls, chunk_hashes: hashes, seconds: started.elapsed().as_secs_f64() })
}

/// The guest memory of `runs`, in file order, adjacent pieces merged.
fn pieces_of(mem: &GuestMemory, runs: &[(u64, u64)]) -> Result<Vec<Piece>, SnapshotError> {
    let page = PAGE_SIZE as u64;
    let image_pages = mem.memsize() / page;
    let mut pieces: Vec<Piece> = Vec::new();
    let mut previous_end = 0u64;
    for &(first, count) in runs {
        let end = first.checked_add(count).filter(|&e| e <= image_pages && first >= previous_end);
        let Some(end) = end else {
            return Err(SnapshotError::Unsupported {
                why: format!(
                    "page run {first}+{count} is not inside the guest's {image_pages} pages after the previous run (ending at {previous_end})"
                ),
            });
        };
        previous_end = end;
        let (start, end) = (first * page, end * page);
        let mut base = 0u64;
        for seg in mem.segments() {
            let size = seg.size() as u64;
            let (a, b) = (start.max(base), end.min(base + size));
            if a < b {
                let (off, len) = ((a - base) as usize, (b - a) as usize);
                seg.ensure(off, len)?;
                let piece = Piece { addr: seg.as_ptr() as usize + off, len, gpa: seg.gpa().0 + (a - base) };
                match pieces.last_mut() {
                    Some(last) if last.addr + last.len == piece.addr => last.len += len,
                    _ => pieces.push(piece),
                }
            }
            base += size;
        }
    }
    Ok(pieces)
}

/// pwritev the pieces back to back from offset 0, in batches; the calls made.
fn write_pieces(fd: RawFd, pieces: &[Piece]) -> Result<u64, SnapshotError> {
    let mut calls = 0u64;
    let mut offset = 0u64;
    let mut batch: Vec<libc::iovec> = Vec::with_capacity(IOV_MAX);
    let mut parts: Vec<Piece> = Vec::with_capacity(IOV_MAX);
    let mut batch_len = 0usize;
    let mut flush = |batch: &mut Vec<libc::iovec>, parts: &mut Vec<Piece>, batch_len: &mut usize, offset: &mut u64| {
        if batch.is_empty() {
            return Ok(());
        }
        // SAFETY: every iovec points into live guest memory (see `pieces_of`); pwritev only reads.
        let n = unsafe { libc::pwritev(fd, batch.as_ptr(), batch.len() as libc::c_int, *offset as libc::off_t) };
        calls += 1;
        let mut done = if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINTR) {
                let p = parts[0];
                return Err(SnapshotError::Io {
                    what: format!("writing the memory file at offset {:#x} (guest-physical {:#x}, {} bytes)", *offset, p.gpa, *batch_len),
                    source: err,
                });
            }
            0
        } else {
            n as usize
        };
        // A short write (or EINTR): the rest of the batch piece by piece.
        let mut at = *offset + done as u64;
        for p in parts.iter() {
            if done >= p.len {
                done -= p.len;
                continue;
            }
            calls += pwrite_all(fd, (p.addr + done) as *const u8, p.len - done, at, p.gpa + done as u64)?;
            at += (p.len - done) as u64;
            done = 0;
        }
        *offset += *batch_len as u64;
        batch.clear();
        parts.clear();
        *batch_len = 0;
        Ok(())
    };
    for p in pieces {
        let mut done = 0;
        while done < p.len {
            if batch.len() == IOV_MAX || batch_len == BATCH {
                flush(&mut batch, &mut parts, &mut batch_len, &mut offset)?;
            }
            let len = (p.len - done).min(BATCH - batch_len);
            let part = Piece { addr: p.addr + done, len, gpa: p.gpa + done as u64 };
            batch.push(libc::iovec { iov_base: part.addr as *mut libc::c_void, iov_len: len });
            parts.push(part);
            batch_len += len;
            done += len;
        }
    }
    flush(&mut batch, &mut parts, &mut batch_len, &mut offset)?;
    Ok(calls)
}
