//! The page batch wire format: what one batch of guest pages looks like on a socket or in a file.
//!
//! ```text
//! offset size  field (all little-endian)
//!  0     4     magic "VMPB"
//!  4     2     version (1)
//!  6     2     flags: 0x0001 LZ4 (below); a reader refuses any it does not know
//!  8     8     segment gpa base: the batch's pages all lie in the segment starting here
//! 16     4     range count (at most MAX_RANGES)
//! 20     4     reserved, 0
//! 24     8     payload length: bytes after the table = 4096 x pages of DATA ranges (LZ4: see below)
//! 32     8     xxh3-64 of bytes 0..32 followed by the whole range table
//! 40     16xN  range table, N entries:  gpa u64 | pages u32 | kind u8 (0 DATA, 1 ZERO) | 3 bytes 0
//! ...          payload: the pages of every DATA range, in table order, 4096 bytes each
//! ```
//!
//! Ranges ascend and do not overlap; a ZERO range carries no bytes and means "these pages are
//! zero". The checksum covers what the receiver must trust before it writes guest memory (where
//! the pages go); the page bytes themselves are covered by the migration's memory digest at
//! commit, and by chunk hashes in a checkpoint, not per batch.
//!
//! **Compressed batches (flag 0x0001 LZ4).** The pages of the DATA ranges, in table order, travel
//! as one LZ4 block (the raw block format, no frame, no size prefix) instead of as themselves:
//!
//! ```text
//! 40+16N  8    xxh3-64 of the LZ4 block
//! 48+16N  L    the LZ4 block; it decompresses to exactly 4096 x pages of DATA ranges
//! ```
//!
//! The payload length is then 8 + L, with 0 < L <= the raw size, and the raw size (4096 x DATA
//! pages) is between one page and [`MAX_COMPRESSED_DATA`] (4 MiB). ZERO ranges are as always.
//! The header checksum covers the flag and the length, the block checksum covers the compressed
//! bytes, so every byte of a compressed batch on the wire is checked before it is decompressed;
//! the receiver decompresses into a scratch buffer of exactly the raw size and writes guest
//! memory only once the block decompressed to exactly that many bytes (`compress.rs`). An
//! older reader refuses the flag ("unknown flags 0x0001"), so a sender uses it only when the
//! stream above has agreed to it (the migration protocol's version 2, SPEC and ACCEPT).
//!
//! This file owns the encoding and the validation; `batch_io` moves the bytes.

use crate::digest::xxh3::Xxh3Short;

use crate::digest::PageError;
use crate::memory::{GuestAddress, Segment, PAGE_SIZE};

pub const BATCH_MAGIC: u32 = u32::from_le_bytes(*b"VMPB");
pub const BATCH_VERSION: u16 = 1;
pub const BATCH_HEADER_SIZE: usize = 40;
pub const RANGE_ENTRY_SIZE: usize = 16;
/// Ranges per batch: bounds the table a receiver allocates (1 MiB) before it can check anything.
pub const MAX_RANGES: u32 = 65536;
/// Header flag: the DATA pages travel as one checksummed LZ4 block.
pub const BATCH_FLAG_LZ4: u16 = 0x0001;
const KNOWN_FLAGS: u16 = BATCH_FLAG_LZ4;
/// The most page data one compressed batch may carry: bounds the receiver's scratch buffers.
pub const MAX_COMPRESSED_DATA: u64 = 4 << 20;
/// Bytes before the LZ4 block in a compressed payload: its xxh3-64.
pub const COMPRESSED_PREFIX: u64 = 8;
const CHECKSUMMED_HEADER: usize = 32;

/// What a range of the table carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RangeKind {
    /// The pages' bytes follow in the payload.
    Data = 0,
    /// The pages are zero; nothing follows.
    Zero = 1,
}

/// `pages` pages from `gpa`, all of one kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRange {
    pub gpa: GuestAddress,
    pub pages: u32,
    pub kind: RangeKind,
}

impl PageRange {
    pub fn bytes(&self) -> u64 {
        self.pages as u64 * PAGE_SIZE as u64
    }
}

/// DATA pages a sender puts in one batch at most (16 MiB): the receiver gets control back that
/// often, to hash what arrived while the rest streams, and one batch never pins more than that.
pub const BATCH_DATA_PAGES: u32 = 4096;

/// Guest memory is received onto 2 MiB huge pages only in regions one batch fills whole, so a
/// batch that must split a DATA range splits it at a 2 MiB guest address where one lies inside
/// what the batch takes.
const REGION_PAGES: u32 = (2 << 20) / PAGE_SIZE as u32;

/// Cut ascending `ranges` into batches of at most `MAX_RANGES` ranges and `max_data_pages` DATA
/// pages each, splitting a DATA range where a batch fills up (ZERO ranges carry no data and only
/// count against the range limit). With room for at least two 2 MiB regions a batch, the split
/// falls on a 2 MiB guest address when the part taken crosses one, so no region of the range is
/// cut between two batches: a batch then carries up to a region less than `max_data_pages`.
pub fn split_batches(ranges: &[PageRange], max_data_pages: u32) -> Vec<Vec<PageRange>> {
    let max_data_pages = max_data_pages.max(1);
    let align = max_data_pages >= 2 * REGION_PAGES;
    let mut batches = Vec::new();
    let mut current: Vec<PageRange> = Vec::new();
    let mut data = 0u32;
    for &r in ranges {
        let mut r = r;
        loop {
            if current.len() == MAX_RANGES as usize || (r.kind == RangeKind::Data && data == max_data_pages) {
                batches.push(std::mem::take(&mut current));
                data = 0;
            }
            if r.kind == RangeKind::Zero {
                current.push(r);
                break;
            }
            let mut take = r.pages.min(max_data_pages - data);
            if align && take < r.pages {
                // Back off to the last region boundary inside the part taken. At a boundary with
                // other pages in the batch already, take none: the region starts the next batch.
                let first = r.gpa.0 / PAGE_SIZE as u64;
                let boundary = (first + take as u64) / REGION_PAGES as u64 * REGION_PAGES as u64;
                if boundary > first || (boundary == first && data > 0) {
                    take = (boundary - first) as u32;
                }
            }
            if take > 0 {
                current.push(PageRange { gpa: r.gpa, pages: take, kind: RangeKind::Data });
            }
            if take == r.pages {
                data += take;
                break;
            }
            // The batch is full, or ends at a region boundary: the rest goes on in the next one.
            batches.push(std::mem::take(&mut current));
            data = 0;
            r = PageRange { gpa: GuestAddress(r.gpa.0 + take as u64 * PAGE_SIZE as u64), pages: r.pages - take, kind: RangeKind::Data };
        }
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

/// The fixed header, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchHeader {
    pub segment_gpa: GuestAddress,
    /// 0, or [`BATCH_FLAG_LZ4`].
    pub flags: u16,
    pub range_count: u32,
    pub payload_len: u64,
    pub checksum: u64,
}

fn checksum(header: &[u8], table: &[u8]) -> u64 {
    let mut hasher = Xxh3Short::new();
    hasher.update(&header[..CHECKSUMMED_HEADER]);
    hasher.update(table);
    hasher.digest()
}

/// Header and range table of a batch, ready to go on the wire before the payload.
pub(crate) fn encode_batch(segment_gpa: GuestAddress, ranges: &[PageRange]) -> Vec<u8> {
    let payload: u64 = ranges.iter().filter(|r| r.kind == RangeKind::Data).map(PageRange::bytes).sum();
    encode_batch_with(segment_gpa, ranges, 0, payload)
}

/// As [`encode_batch`] with explicit flags and payload length (a compressed batch's).
pub(crate) fn encode_batch_with(segment_gpa: GuestAddress, ranges: &[PageRange], flags: u16, payload: u64) -> Vec<u8> {
    let mut buf = Vec::with_capacity(BATCH_HEADER_SIZE + ranges.len() * RANGE_ENTRY_SIZE);
    buf.extend_from_slice(&BATCH_MAGIC.to_le_bytes());
    buf.extend_from_slice(&BATCH_VERSION.to_le_bytes());
    buf.extend_from_slice(&flags.to_le_bytes());
    buf.extend_from_slice(&segment_gpa.0.to_le_bytes());
    buf.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
    buf.extend_from_slice(&0u32.to_le_bytes());
    buf.extend_from_slice(&payload.to_le_bytes());
    buf.extend_from_slice(&0u64.to_le_bytes()); // checksum, filled in below
    for r in ranges {
        buf.extend_from_slice(&r.gpa.0.to_le_bytes());
        buf.extend_from_slice(&r.pages.to_le_bytes());
        buf.extend_from_slice(&[r.kind as u8, 0, 0, 0]);
    }
    let sum = checksum(&buf[..BATCH_HEADER_SIZE], &buf[BATCH_HEADER_SIZE..]);
    buf[CHECKSUMMED_HEADER..BATCH_HEADER_SIZE].copy_from_slice(&sum.to_le_bytes());
    buf
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

/// The end of a round's batches on one stream: a batch with no ranges, for the segment at
/// `segment_gpa` (any segment's base; receivers take it as a no-op). Senders never emit an empty
/// batch otherwise.
pub fn end_of_round_batch(segment_gpa: GuestAddress) -> Vec<u8> {
    encode_batch(segment_gpa, &[])
}

/// Decode the fixed header and check what can be checked before reading the table: magic,
/// version, flags, reserved bits and the range count limit.
pub fn decode_header(bytes: &[u8; BATCH_HEADER_SIZE]) -> Result<BatchHeader, PageError> {
    let magic = u32_at(bytes, 0);
    if magic != BATCH_MAGIC {
        return Err(PageError::BadMagic { got: magic, expected: BATCH_MAGIC });
    }
    let version = u16_at(bytes, 4);
    if version != BATCH_VERSION {
        return Err(PageError::UnsupportedVersion { got: version, supported: BATCH_VERSION });
    }
    let flags = u16_at(bytes, 6);
    if flags & !KNOWN_FLAGS != 0 {
        return Err(PageError::UnknownFlags { got: flags });
    }
    let reserved = u32_at(bytes, 20);
    if reserved != 0 {
        return Err(PageError::ReservedNotZero { what: "header word at offset 20", got: reserved as u64 });
    }
    let range_count = u32_at(bytes, 16);
    if range_count > MAX_RANGES {
        return Err(PageError::TooManyRanges { count: range_count, max: MAX_RANGES });
    }
    Ok(BatchHeader {
        segment_gpa: GuestAddress(u64_at(bytes, 8)),
        flags,
        range_count,
        payload_len: u64_at(bytes, 24),
        checksum: u64_at(bytes, 32),
    })
}

/// Check the checksum over header and table, then decode the table's entries.
pub(crate) fn decode_table(
    header_bytes: &[u8; BATCH_HEADER_SIZE],
    header: &BatchHeader,
    table: &[u8],
) -> Result<Vec<PageRange>, PageError> {
    debug_assert_eq!(table.len(), header.range_count as usize * RANGE_ENTRY_SIZE);
    let expected = checksum(header_bytes, table);
    if header.checksum != expected {
        return Err(PageError::HeaderChecksum { got: header.checksum, expected });
    }
    let mut ranges = Vec::with_capacity(header.range_count as usize);
    for (index, entry) in table.chunks_exact(RANGE_ENTRY_SIZE).enumerate() {
        let gpa = GuestAddress(u64_at(entry, 0));
        let index = index as u32;
        let kind = match entry[12] {
            0 => RangeKind::Data,
            1 => RangeKind::Zero,
            other => return Err(PageError::RangeBadKind { index, gpa, kind: other }),
        };
        if entry[13..16] != [0, 0, 0] {
            return Err(PageError::ReservedNotZero {
                what: "range entry padding",
                got: u32::from_le_bytes([entry[13], entry[14], entry[15], 0]) as u64,
            });
        }
        ranges.push(PageRange { gpa, pages: u32_at(entry, 8), kind });
    }
    Ok(ranges)
}

/// Check that every range is aligned, non-empty, inside `seg`, ascending, and that the DATA
/// ranges add up to the declared payload. Returns the offset in `seg` of each range.
pub(crate) fn validate_ranges(seg: &Segment, header: &BatchHeader, ranges: &[PageRange]) -> Result<Vec<usize>, PageError> {
    let seg_start = seg.gpa().0;
    let seg_end = seg_start + seg.size() as u64;
    let mut previous_end = GuestAddress(seg_start);
    let mut payload = 0u64;
    let mut offsets = Vec::with_capacity(ranges.len());
    for (index, r) in ranges.iter().enumerate() {
        let index = index as u32;
        if !r.gpa.is_page_aligned() {
            return Err(PageError::RangeUnaligned { index, gpa: r.gpa });
        }
        if r.pages == 0 {
            return Err(PageError::RangeEmpty { index, gpa: r.gpa });
        }
        let end = r.gpa.0.checked_add(r.bytes());
        if r.gpa.0 < seg_start || end.is_none_or(|e| e > seg_end) {
            return Err(PageError::RangeOutsideSegment {
                index,
                gpa: r.gpa,
                pages: r.pages,
                segment: seg.name().to_string(),
                start: GuestAddress(seg_start),
                end: GuestAddress(seg_end),
            });
        }
        if index > 0 && r.gpa < previous_end {
            return Err(PageError::RangeOutOfOrder { index, gpa: r.gpa, previous_end });
        }
        previous_end = GuestAddress(end.unwrap_or(seg_end));
        if r.kind == RangeKind::Data {
            payload += r.bytes(); // cannot overflow: the ranges are disjoint and inside the segment
        }
        offsets.push((r.gpa.0 - seg_start) as usize);
    }
    check_payload_length(header, payload)?;
    Ok(offsets)
}

/// The declared payload length against the DATA ranges' `data` bytes: equal for a plain batch;
/// for a compressed one, a block no bigger than the data, of data no bigger than the bound.
fn check_payload_length(header: &BatchHeader, data: u64) -> Result<(), PageError> {
    if header.flags & BATCH_FLAG_LZ4 == 0 {
        if data != header.payload_len {
            return Err(PageError::PayloadLength { declared: header.payload_len, expected: data });
        }
        return Ok(());
    }
    if data == 0 || data > MAX_COMPRESSED_DATA {
        return Err(PageError::CompressedDataSize { data, max: MAX_COMPRESSED_DATA });
    }
    let block = header.payload_len.saturating_sub(COMPRESSED_PREFIX);
    if block == 0 || block > data {
        return Err(PageError::CompressedPayloadLength { declared: header.payload_len, data });
    }
    Ok(())
}
