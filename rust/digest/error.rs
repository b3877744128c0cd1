//! The errors bulk page work reports. Each names the thing, the value and what was expected, so
//! a hostile or damaged batch stream is refused with a sentence a person can act on.

use std::fmt;
use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use crate::memory::{GuestAddress, MemoryError};

/// Which way the bytes were not moving.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// This side was sending and the peer took nothing.
    Send,
    /// This side was receiving and the peer sent nothing.
    Receive,
}

#[derive(Debug)]
pub enum PageError {
    /// Pages `first..first+count` are not all inside the segment.
    PagesOutsideSegment {
        first: u64,
        count: u64,
        segment: String,
        pages: u64,
    },
    /// A bitmap has fewer words than the segment has pages / 64.
    BitmapSize {
        what: &'static str,
        words: usize,
        needed: usize,
        segment: String,
    },
    /// A bitmap marks a page past the end of the segment.
    BitmapPastEnd {
        what: &'static str,
        page: u64,
        segment: String,
        pages: u64,
    },
    /// A chunk size that is zero or not a multiple of the page size.
    BadChunkSize {
        chunk_size: u64,
    },
    /// Ranges handed to `send_batch` that it cannot encode.
    BadSendRanges {
        why: String,
    },
    /// The first four bytes are not a page batch's.
    BadMagic {
        got: u32,
        expected: u32,
    },
    UnsupportedVersion {
        got: u16,
        supported: u16,
    },
    UnknownFlags {
        got: u16,
    },
    ReservedNotZero {
        what: &'static str,
        got: u64,
    },
    TooManyRanges {
        count: u32,
        max: u32,
    },
    HeaderChecksum {
        got: u64,
        expected: u64,
    },
    /// The header's segment base is not the base of any segment of this guest.
    NoSuchSegment {
        gpa: GuestAddress,
    },
    RangeUnaligned {
        index: u32,
        gpa: GuestAddress,
    },
    RangeEmpty {
        index: u32,
        gpa: GuestAddress,
    },
    RangeBadKind {
        index: u32,
        gpa: GuestAddress,
        kind: u8,
    },
    /// A range starts before its segment or runs past its end.
    RangeOutsideSegment {
        index: u32,
        gpa: GuestAddress,
        pages: u32,
        segment: String,
        start: GuestAddress,
        end: GuestAddress,
    },
    /// Ranges must ascend and not overlap.
    RangeOutOfOrder {
        index: u32,
        gpa: GuestAddress,
        previous_end: GuestAddress,
    },
    PayloadLength {
        declared: u64,
        expected: u64,
    },
    /// A round's batches carried more pages than its budget (the guest's page count).
    RoundTooLarge {
        carried: u64,
        max: u64,
    },
    /// A compressed batch arrived on a stream that did not agree to compression.
    CompressionNotAgreed,
    /// A compressed batch must carry 1 page to `max` bytes of page data.
    CompressedDataSize {
        data: u64,
        max: u64,
    },
    /// A compressed payload is its 8-byte checksum and a non-empty block no bigger than the data.
    CompressedPayloadLength {
        declared: u64,
        data: u64,
    },
    /// The LZ4 block does not match the checksum before it.
    CompressedChecksum {
        got: u64,
        expected: u64,
    },
    /// The LZ4 block is not a valid block, or decompresses to more than the table says.
    Decompress {
        data: u64,
        why: String,
    },
    /// The LZ4 block decompressed to fewer bytes than the table's DATA ranges.
    DecompressedLength {
        got: u64,
        expected: u64,
    },
    /// The stream ended inside `what`.
    Truncated {
        what: &'static str,
        expected: u64,
        got: u64,
    },
    /// A blocking socket moved nothing for its whole SO_SNDTIMEO / SO_RCVTIMEO: the peer stopped
    /// taking (`Send`) or sending (`Receive`). `peer` is its address when `fd` is TCP.
    TimedOut {
        what: String,
        fd: RawFd,
        direction: Direction,
        timeout: Duration,
        peer: Option<String>,
    },
    /// An OS call failed.
    Io {
        what: String,
        source: io::Error,
    },
    Memory(MemoryError),
}

impl PageError {
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> PageError {
        PageError::Io { what: what.into(), source }
    }

    /// The errno a kernel-style interface would answer with.
    pub fn errno(&self) -> i32 {
        match self {
            PageError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            PageError::Memory(e) => e.errno(),
            PageError::Truncated { .. } => libc::EPIPE,
            PageError::TimedOut { .. } => libc::EAGAIN,
            PageError::PagesOutsideSegment { .. } => libc::EFAULT,
            PageError::BadChunkSize { .. }
            | PageError::BitmapSize { .. }
            | PageError::BitmapPastEnd { .. }
            | PageError::BadSendRanges { .. } => libc::EINVAL,
            _ => libc::EBADMSG,
        }
    }
}

impl fmt::Display for PageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PageError::PagesOutsideSegment { first, count, segment, pages } => {
                write!(f, "pages {first}..{} are not inside segment '{segment}' of {pages} pages", first.saturating_add(*count))
            }
            PageError::BitmapSize { what, words, needed, segment } => {
                write!(f, "{what} has {words} words but segment '{segment}' needs {needed}")
            }
            PageError::BitmapPastEnd { what, page, segment, pages } => {
                write!(f, "{what} marks page {page} but segment '{segment}' has only {pages} pages")
            }
            PageError::BadChunkSize { chunk_size } => {
                write!(f, "chunk size {chunk_size} is not a positive multiple of the 4096-byte page")
            }
            PageError::BadSendRanges { why } => write!(f, "cannot send this batch: {why}"),
            PageError::BadMagic { got, expected } => {
                write!(f, "not a page batch: magic {got:#010x}, expected {expected:#010x}")
            }
            PageError::UnsupportedVersion { got, supported } => {
                write!(f, "page batch version {got} is not one this vmmpy reads ({supported})")
            }
            PageError::UnknownFlags { got } => write!(f, "page batch has unknown flags {got:#06x}"),
            PageError::ReservedNotZero { what, got } => write!(f, "page batch {what} is reserved and must be 0, got {got:#x}"),
            PageError::TooManyRanges { count, max } => {
                write!(f, "page batch declares {count} ranges, more than the {max} a batch may hold")
            }
            PageError::HeaderChecksum { got, expected } => {
                write!(f, "batch header checksum mismatch: got {got:#018x}, expected {expected:#018x}")
            }
            PageError::NoSuchSegment { gpa } => write!(f, "page batch is for a segment at gpa {gpa}, but no segment starts there"),
            PageError::RangeUnaligned { index, gpa } => write!(f, "range {index} at gpa {gpa} is not page-aligned"),
            PageError::RangeEmpty { index, gpa } => write!(f, "range {index} at gpa {gpa} has 0 pages"),
            PageError::RangeBadKind { index, gpa, kind } => {
                write!(f, "range {index} at gpa {gpa} has unknown kind {kind} (expected 0 DATA or 1 ZERO)")
            }
            PageError::RangeOutsideSegment { index, gpa, pages, segment, start, end } => {
                write!(f, "range {index} at gpa {gpa} of {pages} pages runs past segment '{segment}' ({start}..{end})")
            }
            PageError::RangeOutOfOrder { index, gpa, previous_end } => write!(
                f,
                "range {index} at gpa {gpa} starts before the previous range ends at {previous_end}; ranges must ascend without overlap"
            ),
            PageError::PayloadLength { declared, expected } => {
                write!(f, "page batch declares {declared} payload bytes but its DATA ranges add up to {expected}")
            }
            PageError::RoundTooLarge { carried, max } => {
                write!(f, "the round carried more pages ({carried}) than the guest has ({max})")
            }
            PageError::CompressionNotAgreed => write!(f, "the peer sent a compressed page batch, but no compression was agreed"),
            PageError::CompressedDataSize { data, max } => {
                write!(f, "compressed page batch carries {data} bytes of page data; a compressed batch carries 4096 to {max}")
            }
            PageError::CompressedPayloadLength { declared, data } => write!(
                f,
                "compressed page batch declares a {declared}-byte payload for {data} bytes of page data; \
                 expected an 8-byte checksum and a block of 1 to {data} bytes"
            ),
            PageError::CompressedChecksum { got, expected } => {
                write!(f, "compressed page data checksum mismatch: got {got:#018x}, expected {expected:#018x}")
            }
            PageError::Decompress { data, why } => {
                write!(f, "compressed page data is not a valid LZ4 block of {data} bytes: {why}")
            }
            PageError::DecompressedLength { got, expected } => {
                write!(f, "compressed page data decompressed to {got} bytes but the batch's DATA ranges hold {expected}")
            }
            PageError::Truncated { what, expected, got } => {
                write!(f, "page batch stream ended inside the {what}: got {got} of {expected} bytes")
            }
            PageError::TimedOut { what, fd, direction, timeout, peer } => {
                let peer = peer.as_deref().map_or_else(|| "the peer".to_string(), |p| format!("the peer {p}"));
                let (did, limit) = match direction {
                    Direction::Send => ("took", "SO_SNDTIMEO"),
                    Direction::Receive => ("sent", "SO_RCVTIMEO"),
                };
                write!(f, "{what} (fd {fd}): timed out: {peer} {did} nothing for {} s (the socket's {limit})", seconds(*timeout))
            }
            PageError::Io { what, source } => write!(f, "{what}: {source}"),
            PageError::Memory(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for PageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PageError::Io { source, .. } => Some(source),
            PageError::Memory(e) => Some(e),
            _ => None,
        }
    }
}

impl From<MemoryError> for PageError {
    fn from(e: MemoryError) -> PageError {
        PageError::Memory(e)
    }
}

/// A timeout for messages: whole seconds as `30`, fractions as `0.25`.
fn seconds(d: Duration) -> String {
    let text = format!("{:.3}", d.as_secs_f64());
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}
