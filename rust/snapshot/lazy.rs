//! Lazy restore from a memory file: guest memory whose chunks are read from the file and checked
//! against the checkpoint's chunk hashes the first time anything needs them (`memory::LazyImage`
//! says how the guest is kept from seeing a chunk before that).
//!
//! A chunk is loaded by reading the file's data extents inside it (SEEK_DATA/SEEK_HOLE, found at
//! load time, so a file rewritten since cannot mislead us) straight into guest memory, hashing
//! them with the holes as zeros, and comparing with the recorded hash. The file's size is checked
//! at every load: a file truncated under a running guest fails the chunks not yet loaded with
//! "truncated", and since the file is never mapped nothing can fault.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;

use super::chunks::ChunkHasher;
use super::error::SnapshotError;
use super::memfile::{check_chunk_size, file_stat, page_extents, pread_all};
use super::pagecache::{sampled_cold, CachePolicy, CacheRelease, RELEASE_ALIGN};
use crate::memory::{ChunkFault, ChunkPart, ChunkSource, GuestMemory, MemoryOptions};

/// A checkpoint memory file and the hashes its chunks must have.
struct FileChunks {
    name: String,
    fd: OwnedFd,
    size: u64,
    chunk_size: usize,
    hashes: Vec<u128>,
    /// The hash of a whole chunk of zeros: most chunks of a sparse guest are all hole.
    zero_chunk: OnceLock<u128>,
    /// Whether a loaded chunk's pages are dropped from the page cache (the file was not cached
    /// when the restore began: `pagecache.rs`).
    cache: CacheRelease,
}

/// Guest memory restored lazily from the memory file open at `fd` (a duplicate is kept): lowmem
/// from file offset 0, highmem right after it; each chunk is read and compared with
/// `hashes[chunk]` when first needed. Nothing is read now. `name` is how errors refer to the file
/// (e.g. "checkpoint 'vm0.ckp'"). The file must be exactly `opts.memsize` bytes, and
/// there must be one hash per `chunk_size` chunk.
pub fn lazy_memory(opts: &MemoryOptions, fd: RawFd, hashes: Vec<u128>, chunk_size: u64, name: &str) -> Result<GuestMemory, SnapshotError> {
    lazy_memory_cached(opts, fd, hashes, chunk_size, name, CachePolicy::Auto)
}

/// [`lazy_memory`] with what chunk loads do to the page cache they read through
/// (`pagecache.rs`): `Auto` drops each loaded chunk from a file that was cold now, `Release`
/// from any, `Keep` never.
pub fn lazy_memory_cached(
    opts: &MemoryOptions,
    fd: RawFd,
    hashes: Vec<u128>,
    chunk_size: u64,
    name: &str,
    cache: CachePolicy,
) -> Result<GuestMemory, SnapshotError> {
    let chunk = check_chunk_size(chunk_size)?;
    let st = file_stat(fd, name)?;
    let size = st.st_size as u64;
    if size != opts.memsize {
        return Err(SnapshotError::FileSize { size, expected: opts.memsize });
    }
    let expected = size.div_ceil(chunk_size) as usize;
    if hashes.len() != expected {
        return Err(SnapshotError::ChunkCount { got: hashes.len(), expected, chunk_size });
    }
    // SAFETY: F_DUPFD_CLOEXEC only reads the descriptor number; a bad fd is reported as EBADF.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(SnapshotError::io(format!("{name}: duplicating fd {fd}")));
    }
    // SAFETY: fcntl returned a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(dup) };
    // A chunk smaller than the cache's largest folios would drop its neighbours' pages that
    // readahead just brought in, and they would be read from the disk again: keep the cache.
    let cache = if (chunk as u64).is_multiple_of(RELEASE_ALIGN) { cache } else { CachePolicy::Keep };
    // Judged from samples of the file's data: restoring lazily stays constant time whatever the
    // file holds and however much of it is cached.
    let raw = fd.as_raw_fd();
    let cache = CacheRelease::new(raw, cache, || sampled_cold(raw, size));
    let source = FileChunks { name: name.to_string(), fd, size, chunk_size: chunk, hashes, zero_chunk: OnceLock::new(), cache };
    Ok(GuestMemory::lazy(opts, chunk, Box::new(source))?)
}

impl ChunkSource for FileChunks {
    fn name(&self) -> &str {
        &self.name
    }

    unsafe fn load(&self, index: usize, parts: &[ChunkPart]) -> Result<(), ChunkFault> {
        let fd = self.fd.as_raw_fd();
        let start = index as u64 * self.chunk_size as u64;
        let end = (start + self.chunk_size as u64).min(self.size);
        let truncated = || match file_stat(fd, &self.name) {
            Ok(st) if (st.st_size as u64) < end => Some(ChunkFault::Truncated { size: st.st_size as u64 }),
            _ => None,
        };
        if let Some(fault) = truncated() {
            return Err(fault);
        }
        let extents = page_extents(fd, start, end).map_err(fault_of)?;
        if extents.is_empty() && end - start == self.chunk_size as u64 {
            let zero = *self.zero_chunk.get_or_init(|| ChunkHasher::zero_hash(self.chunk_size));
            return if zero == self.hashes[index] { Ok(()) } else { Err(ChunkFault::Mismatch) };
        }
        let mut hasher = ChunkHasher::new(self.chunk_size, end - start);
        let mut pos = start;
        for (a, b) in extents {
            hasher.zeros(a - pos);
            for part in parts {
                let p_start = start + part.chunk_offset as u64;
                let (x, y) = (a.max(p_start), b.min(p_start + part.len as u64));
                if x >= y {
                    continue;
                }
                let dst = part.ptr.wrapping_add((x - p_start) as usize);
                let len = (y - x) as usize;
                // SAFETY: as below; POPULATE_WRITE only faults the pages in, advisory.
                unsafe { libc::madvise(dst as *mut libc::c_void, len, libc::MADV_POPULATE_WRITE) };
                // SAFETY: dst..dst+len lies inside the part, which the caller gives us writable
                // and untouched by anyone else until we return.
                if let Err(err) = unsafe { pread_all(fd, dst, len, x) } {
                    // A file that ended early was truncated while we read it.
                    return Err(truncated().unwrap_or_else(|| fault_of(err)));
                }
                // SAFETY: the same range, just filled.
                hasher.data(unsafe { std::slice::from_raw_parts(dst, len) });
            }
            pos = b;
        }
        hasher.zeros(end - pos);
        if hasher.finish().first() != Some(&self.hashes[index]) {
            return Err(ChunkFault::Mismatch);
        }
        self.cache.drop_chunk(start, end);
        Ok(())
    }
}

fn fault_of(err: SnapshotError) -> ChunkFault {
    let errno = err.errno();
    ChunkFault::Io { errno, detail: err.to_string() }
}
