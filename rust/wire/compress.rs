//! Optional LZ4 compression of page batches: the sender's rule for when a batch is worth
//! compressing. (The receiver's end is `decompress`.)
//!
//! The wire format (flag `BATCH_FLAG_LZ4`, a checksummed LZ4 block in place of the DATA pages)
//! is `batch.rs`'s; whether a stream may carry it at all is agreed above (the migration
//! protocol). This file owns the sending end of it.
//!
//! **Sending.** [`Compressor::send_ranges`] cuts a segment's ranges into batches. In `Lz4` mode
//! every batch of up to [`COMPRESS_BLOCK_PAGES`] DATA pages is tried: its pages are copied into a
//! scratch buffer (a snapshot: a guest writing meanwhile cannot make the block describe bytes
//! that never were; its write sets a dirty bit and the next round resends the page), compressed,
//! and sent compressed when the block is at most 3/4 of the pages ([`WORTH`]), plain otherwise.
//! `Auto` adds two things: the time rule, a batch *pays* only if the wire time it saves at the
//! link's speed exceeds the time its compression took, `(raw - compressed) / link > t_compress`;
//! and a back-off, after a batch that does not pay (too big, or too slow for this link) the next
//! 1 MiB of DATA goes plain without trying, then 2, 4, ... up to [`MAX_SKIP_PAGES`] (256 MiB),
//! until a batch pays again. Incompressible memory thus costs about one trial per doubling.
//! The link's speed is the caller's hint (a bandwidth cap, or what an earlier round measured) or,
//! once [`LINK_SAMPLE_MIN`] bytes went, bytes per second spent blocked in writes, whichever is
//! lower; with neither, compression is assumed not to pay (a fast local link is the common case
//! and guessing wrong there costs the most). Batches sent while skipping are up to 64 MiB, so the
//! receiver keeps populating ahead of its reads as for plain rounds.
//!

use std::time::Instant;

use crate::digest::xxh3::xxh3_64;

use super::batch::{encode_batch_with, validate_ranges, BatchHeader, PageRange, RangeKind, BATCH_FLAG_LZ4, COMPRESSED_PREFIX, MAX_RANGES};
use super::batch_io::{batch_segment, runs_of, send_batch_tracked, BatchStats};
use super::fdio::{write_all, Link};
use crate::digest::DigestTracker;
use crate::digest::PageError;
use crate::memory::{GuestAddress, GuestMemory, PAGE_SIZE};

/// DATA pages per tried batch: 1 MiB, where LZ4's ratio has long stopped improving (its window
/// is 64 KiB) and a batch that does not pay has cost little.
pub const COMPRESS_BLOCK_PAGES: u64 = 256;
/// The longest back-off, in DATA pages sent plain before the next trial (256 MiB).
pub const MAX_SKIP_PAGES: u64 = 65536;
/// Plain batches sent while backing off hold at most this many DATA pages (64 MiB).
const SKIP_BATCH_PAGES: u64 = 16384;
/// Bytes written before the blocked-write time says anything about the link: the first few MiB
/// only fill socket buffers.
pub const LINK_SAMPLE_MIN: u64 = 16 << 20;
/// A block is worth sending when compressed * WORTH.1 <= raw * WORTH.0 (3/4).
pub const WORTH: (u64, u64) = (3, 4);

/// What the sender does with batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressMode {
    /// Never compress (the only mode an older peer understands).
    Off,
    /// Try every batch; send it compressed when that makes it at most 3/4 of its size.
    Lz4,
    /// As `Lz4` only while it pays on this link, with a back-off after batches that do not.
    Auto,
}

impl CompressMode {
    pub fn parse(text: &str) -> Result<CompressMode, String> {
        match text {
            "off" => Ok(CompressMode::Off),
            "lz4" => Ok(CompressMode::Lz4),
            "auto" => Ok(CompressMode::Auto),
            other => Err(format!("compression mode must be off, lz4 or auto; got {other:?}")),
        }
    }
}

/// The sender's compression state for one call (a round): mode, back-off, the link estimate,
/// scratch buffers, and what it tried.
pub struct Compressor {
    mode: CompressMode,
    link_hint: Option<f64>,
    skip_pages: u64,
    backoff_pages: u64,
    written: u64,
    write_secs: f64,
    input: Vec<u8>,
    output: Vec<u8>,
    /// Batches compressed to see whether they shrink (sent compressed or not).
    pub attempts: u64,
}

impl Compressor {
    /// `link_hint`: bytes/s the link is believed to carry (a cap, or an earlier measurement).
    pub fn new(mode: CompressMode, link_hint: Option<f64>) -> Compressor {
        Compressor {
            mode,
            link_hint: link_hint.filter(|r| r.is_finite() && *r > 0.0),
            skip_pages: 0,
            backoff_pages: COMPRESS_BLOCK_PAGES,
            written: 0,
            write_secs: 0.0,
            input: Vec::new(),
            output: Vec::new(),
            attempts: 0,
        }
    }

    pub fn mode(&self) -> CompressMode {
        self.mode
    }

    /// The link speed the time rule uses: the lower of the hint and the measured blocked-write
    /// rate (once enough was written), or None when neither is known.
    pub fn link_rate(&self) -> Option<f64> {
        let measured = (self.written >= LINK_SAMPLE_MIN && self.write_secs > 0.0).then(|| self.written as f64 / self.write_secs);
        match (self.link_hint, measured) {
            (Some(h), Some(m)) => Some(h.min(m)),
            (h, m) => h.or(m),
        }
    }

    /// Send one segment's `ranges` (ascending, as `build_ranges_*` make them) as batches,
    /// calling `each` with every batch's statistics.
    pub fn send_ranges<'a>(
        &mut self,
        link: impl Into<Link<'a>>,
        mem: &GuestMemory,
        ranges: &[PageRange],
        tracker: Option<&DigestTracker>,
        mut each: impl FnMut(BatchStats),
    ) -> Result<(), PageError> {
        let link = link.into();
        let mut queue = ranges.iter().copied();
        let mut carry: Option<PageRange> = None;
        loop {
            let trying = self.mode != CompressMode::Off && self.skip_pages == 0;
            let budget = match (self.mode, trying) {
                (CompressMode::Off, _) => u64::MAX,
                (_, true) => COMPRESS_BLOCK_PAGES,
                (_, false) => self.skip_pages.min(SKIP_BATCH_PAGES),
            };
            let mut batch = Vec::new();
            let mut data_pages = 0u64;
            while batch.len() < MAX_RANGES as usize {
                let Some(r) = carry.take().or_else(|| queue.next()) else { break };
                if r.kind == RangeKind::Zero {
                    batch.push(r);
                    continue;
                }
                let left = budget - data_pages;
                if left == 0 {
                    carry = Some(r);
                    break;
                }
                if r.pages as u64 <= left {
                    data_pages += r.pages as u64;
                    batch.push(r);
                } else {
                    // left < r.pages <= u32::MAX, so both halves fit a u32.
                    batch.push(PageRange { pages: left as u32, ..r });
                    carry = Some(PageRange {
                        gpa: GuestAddress(r.gpa.0 + left * PAGE_SIZE as u64),
                        pages: r.pages - left as u32,
                        kind: r.kind,
                    });
                    data_pages += left;
                }
            }
            if batch.is_empty() {
                return Ok(());
            }
            let stats = if trying && data_pages > 0 {
                self.try_compressed(link, mem, &batch, data_pages, tracker)?
            } else {
                self.skip_pages = self.skip_pages.saturating_sub(data_pages);
                self.send_plain(link, mem, &batch, tracker)?
            };
            each(stats);
        }
    }

    fn note_write(&mut self, bytes: u64, started: Instant) {
        self.written += bytes;
        self.write_secs += started.elapsed().as_secs_f64();
    }

    fn send_plain(
        &mut self,
        link: Link<'_>,
        mem: &GuestMemory,
        batch: &[PageRange],
        tracker: Option<&DigestTracker>,
    ) -> Result<BatchStats, PageError> {
        let started = Instant::now();
        let stats = send_batch_tracked(link, mem, batch, tracker)?;
        self.note_write(stats.wire_bytes, started);
        Ok(stats)
    }

    /// Compress the batch's pages; send them compressed if the block is worth it, plain if not;
    /// update the back-off (Auto).
    fn try_compressed(
        &mut self,
        link: Link<'_>,
        mem: &GuestMemory,
        batch: &[PageRange],
        data_pages: u64,
        tracker: Option<&DigestTracker>,
    ) -> Result<BatchStats, PageError> {
        let seg = batch_segment(mem, batch)?;
        let raw = (data_pages * PAGE_SIZE as u64) as usize;
        let header =
            BatchHeader { segment_gpa: seg.gpa(), flags: 0, range_count: batch.len() as u32, payload_len: raw as u64, checksum: 0 };
        let offsets = validate_ranges(seg, &header, batch)?;
        super::ready_ranges(seg, batch, &offsets)?;
        if let Some(tracker) = tracker {
            // Hashed before the copy below reads the pages again, from the cache.
            tracker.hash_now(seg, &runs_of(RangeKind::Zero, batch, &offsets), true)?;
            tracker.hash_now(seg, &runs_of(RangeKind::Data, batch, &offsets), false)?;
        }
        if self.input.len() < raw {
            self.input.resize(raw, 0);
            self.output.resize(COMPRESSED_PREFIX as usize + lz4_flex::block::get_maximum_output_size(raw), 0);
        }
        let mut at = 0;
        for (r, &off) in batch.iter().zip(&offsets).filter(|(r, _)| r.kind == RangeKind::Data) {
            let len = r.bytes() as usize;
            // SAFETY: validate_ranges keeps the range inside the mapping, which `mem` keeps mapped;
            // `input` holds at least `raw` bytes, the sum of the DATA ranges. Guest memory is read
            // through a raw pointer, never a reference, so a racing guest write aliases nothing.
            unsafe { std::ptr::copy_nonoverlapping(seg.as_ptr().add(off), self.input.as_mut_ptr().add(at), len) };
            at += len;
        }
        let started = Instant::now();
        let block = lz4_flex::block::compress_into(&self.input[..raw], &mut self.output[COMPRESSED_PREFIX as usize..])
            .map_err(|e| PageError::BadSendRanges { why: format!("LZ4 compression of {raw} bytes failed: {e}") })?;
        let seconds = started.elapsed().as_secs_f64();
        self.attempts += 1;
        let worth = block as u64 * WORTH.1 <= raw as u64 * WORTH.0;
        if self.mode == CompressMode::Auto {
            let saved_secs = self.link_rate().map(|link| raw.saturating_sub(block) as f64 / link);
            let pays = worth && saved_secs.is_some_and(|s| s > seconds);
            if pays {
                self.backoff_pages = COMPRESS_BLOCK_PAGES;
            } else {
                self.skip_pages = self.backoff_pages;
                self.backoff_pages = (self.backoff_pages * 2).min(MAX_SKIP_PAGES);
            }
        }
        if !worth {
            return self.send_plain(link, mem, batch, None); // hashed above
        }
        let prefix = COMPRESSED_PREFIX as usize;
        let sum = xxh3_64(&self.output[prefix..prefix + block]);
        self.output[..prefix].copy_from_slice(&sum.to_le_bytes());
        let payload = prefix + block;
        let encoded = encode_batch_with(seg.gpa(), batch, BATCH_FLAG_LZ4, payload as u64);
        let mut iovs = [
            libc::iovec { iov_base: encoded.as_ptr() as *mut libc::c_void, iov_len: encoded.len() },
            libc::iovec { iov_base: self.output.as_ptr() as *mut libc::c_void, iov_len: payload },
        ];
        let started = Instant::now();
        // SAFETY: both iovecs describe buffers this function holds until the call returns; the
        // kernel only reads them.
        unsafe { write_all(link, &mut iovs, "sending a compressed page batch")? };
        let mut stats = BatchStats::of(batch);
        stats.compressed_batches = 1;
        stats.saved_bytes = (raw - payload) as u64;
        stats.wire_bytes -= stats.saved_bytes;
        self.note_write(stats.wire_bytes, started);
        Ok(stats)
    }
}
