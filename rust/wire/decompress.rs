//! The receiving end of LZ4-compressed page batches (the sending end is `compress`).
//!
//! [`recv_lz4_payload`] reads the payload (bounded by `MAX_COMPRESSED_DATA` + 8,
//! checked in `validate_ranges`) into a per-thread scratch buffer, checks the block's checksum,
//! decompresses it into a second scratch buffer of exactly the size the table gives (LZ4 cannot
//! write past it: a block that would is refused, so a decompression bomb costs nothing), requires
//! exactly that many bytes back, and only then copies the pages into guest memory (installs them,
//! where an installation is open: `memory::install`).

use std::cell::RefCell;

use crate::digest::xxh3::xxh3_64;

use super::batch::{BatchHeader, PageRange, RangeKind, BATCH_FLAG_LZ4, COMPRESSED_PREFIX, MAX_COMPRESSED_DATA};
use super::fdio::{read_all, Link};
use crate::digest::PageError;
use crate::memory::{InstallGuard, Segment};

thread_local! {
    /// The receiver's scratch: the payload as it arrived, and the pages it decompresses to. Each
    /// is allocated once per receiving thread at its bound and reused.
    static SCRATCH: RefCell<(Vec<u8>, Vec<u8>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Read a compressed batch's payload, check it, decompress it whole and only then copy the pages
/// into `seg`. `header`, `ranges` and `offsets` are validated (`validate_ranges`): the payload and
/// the data are within their bounds.
pub(super) fn recv_lz4_payload(
    link: Link<'_>,
    seg: &Segment,
    header: &BatchHeader,
    ranges: &[PageRange],
    offsets: &[usize],
    installer: Option<&InstallGuard<'_>>,
) -> Result<(), PageError> {
    let data: u64 = ranges.iter().filter(|r| r.kind == RangeKind::Data).map(PageRange::bytes).sum();
    if header.flags & BATCH_FLAG_LZ4 == 0 || data == 0 || data > MAX_COMPRESSED_DATA || header.payload_len > COMPRESSED_PREFIX + data {
        return Err(PageError::CompressedPayloadLength { declared: header.payload_len, data });
    }
    SCRATCH.with(|cell| {
        let mut scratch = cell.borrow_mut();
        let (packed, plain) = &mut *scratch;
        if packed.is_empty() {
            *packed = vec![0; (COMPRESSED_PREFIX + MAX_COMPRESSED_DATA) as usize];
            *plain = vec![0; MAX_COMPRESSED_DATA as usize];
        }
        let payload = &mut packed[..header.payload_len as usize];
        let mut iov = [libc::iovec { iov_base: payload.as_mut_ptr() as *mut libc::c_void, iov_len: payload.len() }];
        // SAFETY: the iovec describes `payload`, borrowed mutably for the call.
        let got = unsafe { read_all(link, &mut iov, "receiving compressed page data")? };
        if got < header.payload_len {
            return Err(PageError::Truncated { what: "compressed page data", expected: header.payload_len, got });
        }
        let (sum, block) = payload.split_at(COMPRESSED_PREFIX as usize);
        let stored = u64::from_le_bytes(sum.try_into().unwrap_or([0; 8]));
        let actual = xxh3_64(block);
        if stored != actual {
            return Err(PageError::CompressedChecksum { got: stored, expected: actual });
        }
        let pages = &mut plain[..data as usize];
        let n = lz4_flex::block::decompress_into(block, pages).map_err(|e| PageError::Decompress { data, why: e.to_string() })?;
        if n as u64 != data {
            return Err(PageError::DecompressedLength { got: n as u64, expected: data });
        }
        let mut at = 0;
        for (r, &off) in ranges.iter().zip(offsets).filter(|(r, _)| r.kind == RangeKind::Data) {
            let len = r.bytes() as usize;
            // SAFETY: validate_ranges keeps the range inside the segment's mapping; `pages` holds
            // the sum of the DATA ranges; guest memory is never behind a Rust reference.
            seg.before_write(off, len);
            match installer {
                Some(installer) => unsafe { installer.install(off, &pages[at..at + len]) },
                None => unsafe { std::ptr::copy_nonoverlapping(pages.as_ptr().add(at), seg.as_ptr().add(off), len) },
            }
            at += len;
        }
        Ok(())
    })
}
