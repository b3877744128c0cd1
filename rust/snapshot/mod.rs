//! The checkpoint memory file: guest memory as bhyve's `FILE` (lowmem at file offset 0, highmem
//! right after it, the 3-4 GiB hole not stored), written sparse and read back eagerly, with
//! xxh3-128 hashes of fixed-size chunks of that image so a damaged file is caught before a guest
//! runs on it. Lazy restore (`lazy_memory`) reads and checks one chunk at a time, when the guest
//! first needs it. A diff checkpoint's file holds only given pages, packed (`write_packed_pages`).
//!
//! This module owns the bytes of the memory file and its chunk hashes. It does not own the
//! `.kern` and `.meta` files, nor decide where hashes are stored or when to verify: that is the
//! Python `vmmpy.snapshot` package. Every function takes a raw fd the caller keeps open and
//! never touches Python, so the bindings run them with the GIL released.
//!
//! The image: byte `i` of the file is byte `i - file_offset(seg)` of the segment holding it,
//! segments in guest-physical order, each at the file offset equal to the sum of the sizes of
//! the segments before it. Chunk `k` covers image bytes `k*C .. min((k+1)*C, size)` and may span
//! the lowmem/highmem boundary; its hash is xxh3-128 (seed 0) of those bytes, holes read as zero.

mod chunks;
mod error;
mod image;
mod lazy;
mod live;
mod memfile;
mod packed;
mod pagecache;

pub use chunks::ChunkHasher;
pub use error::SnapshotError;
pub use image::ImageLayout;
pub use lazy::{lazy_memory, lazy_memory_cached};
pub use live::write_memory_file_live;
pub use memfile::{
    hash_memory_file, memory_chunk_hashes, memory_file_is_cold, read_memory_file, read_memory_file_cached, write_memory_file, ReadStats,
    WriteStats,
};
pub use packed::{write_packed_pages, PackedStats};
pub use pagecache::{cached_pages, CachePolicy};

/// The chunk size checkpoints use unless told otherwise: 4 MiB, bhyve's `SNAPSHOT_CHUNK`.
pub const DEFAULT_CHUNK_SIZE: u64 = 4 << 20;

#[cfg(test)]
mod live_tests;
#[cfg(test)]
mod pagecache_tests;
#[cfg(test)]
mod tests;
