//! Page batches on the wire: the batch format (`batch`), building a round's ranges from a dirty
//! bitmap (`ranges`), moving batches over file descriptors (send pages straight from guest
//! memory, receive straight into it: `batch_io`, over `fdio`'s byte moving), optionally
//! LZ4-compressed per batch (`compress` sends, `decompress` receives), one round over several
//! fds at once (`streams`), and post-copy's page requests and replies (`postcopy`, over `fdio`). The files import downwards only: `streams` -> `compress` ->
//! `batch_io` -> `decompress` -> `fdio` -> `tls` -> `stall`, all on `batch` (the format).
//!
//! This module owns the bytes of a page batch on the wire. It does not own the mappings or the
//! dirty bits (`memory`, `dirty`), nor the hashes (`digest`, which it feeds as pages go by), nor
//! decide which pages to send, when, or how batches are framed inside a migration stream or a
//! checkpoint (Python policy above). Every function takes `&GuestMemory` and raw fds the caller
//! owns and never touches Python, so the bindings can call them with the GIL released.
//!
//! Guest memory may be written by a running guest while a batch is sent from it, as DMA races a
//! CPU on real hardware: a sent page is then a snapshot of some moment, and the dirty bit that
//! write set makes the next round send it again.

mod batch;
mod batch_io;
mod compress;
mod decompress;
mod fdio;
mod postcopy;
mod ranges;
mod stall;
mod streams;
mod tls;
mod tls_records;

pub use batch::{
    decode_header as decode_batch_header, end_of_round_batch, split_batches, BatchHeader, PageRange, RangeKind, BATCH_DATA_PAGES,
    BATCH_FLAG_LZ4, BATCH_HEADER_SIZE, BATCH_MAGIC, BATCH_VERSION, COMPRESSED_PREFIX, MAX_COMPRESSED_DATA, MAX_RANGES, RANGE_ENTRY_SIZE,
};
pub use batch_io::{recv_batch, recv_batch_tracked, send_batch, send_batch_metered, send_batch_tracked, BatchStats, BatchTotals};
pub use compress::{CompressMode, Compressor, COMPRESS_BLOCK_PAGES, LINK_SAMPLE_MIN, MAX_SKIP_PAGES, WORTH};
pub use fdio::Link;
pub use postcopy::{
    make_postcopy, serve_pages, ChunkNeeds, LinkSource, LinkStats, PageConn, PostcopyLink, ServeStats,
    DEFAULT_CHUNK_SIZE as POSTCOPY_CHUNK, MAX_CHUNK_PAGES as POSTCOPY_MAX_CHUNK_PAGES,
};
pub use ranges::{build_ranges_from_bitmap, build_ranges_with_residency};
pub use streams::{recv_share, send_chunks, send_chunks_compressed, PageBudget, Sending, MAX_STREAMS};
pub use tls::{HandshakeFailure, IdentityError, RecvError, Side, TlsIdentity, TlsStream, Wait};

use crate::digest::PageError;
use crate::memory::Segment;

/// Make the ranges of a checked batch (`batch::validate_ranges` gave their offsets in `seg`) ready
/// to be read or written: on lazily restored memory, their chunks are loaded and checked first.
fn ready_ranges(seg: &Segment, ranges: &[PageRange], offsets: &[usize]) -> Result<(), PageError> {
    for (r, &off) in ranges.iter().zip(offsets) {
        seg.ensure(off, r.bytes() as usize)?;
    }
    Ok(())
}

#[cfg(test)]
mod batch_tests;
#[cfg(test)]
mod compress_tests;
#[cfg(test)]
mod postcopy_tests;
