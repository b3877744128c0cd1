//! Whole pages written into guest memory past the cache.
//!
//! A receiver that reads page data into a small staging buffer (which stays in the cache, read
//! after read) and then puts each page in place writes guest memory it will not read again soon.
//! An ordinary store first reads the line it writes (the old bytes come from memory, only to be
//! overwritten) and leaves the new bytes in the cache, pushing the staging buffer out. A
//! non-temporal store does neither: the line goes to memory once. A/B in docs/performance.md
//! (session 26).

use super::PAGE_SIZE;

/// Copy the 4 KiB page at `src` to `dst` with non-temporal stores. The stores are weakly ordered:
/// call [`stream_fence`] before anything else may read `dst` (another thread, the kernel).
///
/// # Safety
/// `src` must be readable and `dst` writable for a page, both 16-byte aligned, not overlapping,
/// and `dst` not behind a Rust reference (guest memory never is).
#[inline]
pub(crate) unsafe fn stream_page(dst: *mut u8, src: *const u8) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_load_si128, _mm_stream_si128};
        let (d, s) = (dst as *mut __m128i, src as *const __m128i);
        // Four lines' worth of loads before their stores, 16 bytes at a time (SSE2, which every
        // x86_64 has; the stores are bound by memory, not by their width).
        for i in (0..PAGE_SIZE / 16).step_by(4) {
            // SAFETY: the caller's contract: both pages are valid and 16-byte aligned, and
            // `i + 3 < PAGE_SIZE / 16`.
            unsafe {
                let (a, b, c, e) =
                    (_mm_load_si128(s.add(i)), _mm_load_si128(s.add(i + 1)), _mm_load_si128(s.add(i + 2)), _mm_load_si128(s.add(i + 3)));
                _mm_stream_si128(d.add(i), a);
                _mm_stream_si128(d.add(i + 1), b);
                _mm_stream_si128(d.add(i + 2), c);
                _mm_stream_si128(d.add(i + 3), e);
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    // SAFETY: the caller's contract.
    unsafe {
        std::ptr::copy_nonoverlapping(src, dst, PAGE_SIZE)
    };
}

/// Order every [`stream_page`] store of this thread before its later loads and stores.
#[inline]
pub(crate) fn stream_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a fence has no operands and no other effect.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[repr(C, align(4096))]
    struct Page([u8; PAGE_SIZE]);

    #[test]
    fn a_streamed_page_holds_the_source_bytes_and_nothing_past_it_changes() {
        let src = Box::new(Page(std::array::from_fn(|i| (i * 7 + 3) as u8)));
        let mut dst = Box::new([Page([0xEE; PAGE_SIZE]), Page([0xEE; PAGE_SIZE])]);
        // SAFETY: both are page-aligned pages of their own.
        unsafe { stream_page(dst[0].0.as_mut_ptr(), src.0.as_ptr()) };
        stream_fence();
        assert_eq!(dst[0].0, src.0);
        assert!(dst[1].0.iter().all(|&b| b == 0xEE));
    }
}
