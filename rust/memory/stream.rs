//! Whole pages written into guest memory past the cache.
//!
//! A receiver that reads page data into a small staging buffer (which stays in the cache, read
//! after read) and then puts each page in place writes guest memory it will not read again soon.
//! An ordinary store first reads the line it writes (the old bytes come from memory, only to be
//! overwritten) and leaves the new bytes in the cache, pushing the staging buffer out. A
//! non-temporal store does neither: the line goes to memory once. A/B in docs/performance.md
//! (session 26).

use super::PAGE_SIZE;

/// A page, aligned as one: what staging buffers are made of (pages read into them, hashed there
/// and put in place from them).
#[repr(C, align(4096))]
pub(crate) struct AlignedPage(pub(crate) [u8; PAGE_SIZE]);

/// `pages` pages, zeroed by the allocator.
pub(crate) fn zeroed_pages(pages: usize) -> Box<[AlignedPage]> {
    if pages == 0 {
        return Box::new([]);
    }
    let layout = std::alloc::Layout::array::<AlignedPage>(pages).expect("a staging buffer's layout");
    // SAFETY: the layout is not zero-sized; an all-zero page is a valid value; the pointer, when
    // not null, owns `pages` pages allocated with this layout, as `Box` expects.
    unsafe {
        let ptr = std::alloc::alloc_zeroed(layout) as *mut AlignedPage;
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Box::from_raw(std::ptr::slice_from_raw_parts_mut(ptr, pages))
    }
}

/// The bytes of `pages`.
pub(crate) fn page_bytes(pages: &[AlignedPage]) -> &[u8] {
    // SAFETY: the pages are `pages.len() * PAGE_SIZE` contiguous initialized bytes.
    unsafe { std::slice::from_raw_parts(pages.as_ptr() as *const u8, pages.len() * PAGE_SIZE) }
}

/// The bytes of `pages`, to be written.
pub(crate) fn page_bytes_mut(pages: &mut [AlignedPage]) -> &mut [u8] {
    // SAFETY: as `page_bytes`, borrowed mutably.
    unsafe { std::slice::from_raw_parts_mut(pages.as_mut_ptr() as *mut u8, pages.len() * PAGE_SIZE) }
}

/// Copy the whole pages of `src` (16-byte aligned) to `dst` with [`stream_page`], fenced after.
///
/// # Safety
/// `dst` must be writable for `src.len()` bytes, 16-byte aligned, not overlapping `src` and not
/// behind a Rust reference.
pub(crate) unsafe fn stream_pages(dst: *mut u8, src: &[u8]) {
    assert!(
        src.len().is_multiple_of(PAGE_SIZE) && (src.as_ptr() as usize).is_multiple_of(16) && (dst as usize).is_multiple_of(16),
        "whole aligned pages"
    );
    for at in (0..src.len()).step_by(PAGE_SIZE) {
        // SAFETY: the caller's contract for `dst`; `src` holds the page at `at`.
        unsafe { stream_page(dst.add(at), src.as_ptr().add(at)) };
    }
    stream_fence();
}

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

    #[test]
    fn a_streamed_page_holds_the_source_bytes_and_nothing_past_it_changes() {
        let src = Box::new(AlignedPage(std::array::from_fn(|i| (i * 7 + 3) as u8)));
        let mut dst = Box::new([AlignedPage([0xEE; PAGE_SIZE]), AlignedPage([0xEE; PAGE_SIZE])]);
        // SAFETY: both are page-aligned pages of their own.
        unsafe { stream_page(dst[0].0.as_mut_ptr(), src.0.as_ptr()) };
        stream_fence();
        assert_eq!(dst[0].0, src.0);
        assert!(dst[1].0.iter().all(|&b| b == 0xEE));
    }
}
