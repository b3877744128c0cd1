//! Guest memory: segments mapped at guest-physical addresses, laid out as bhyve's
//! `vm_setup_memory` does (lowmem at GPA 0 up to the lowmem limit, highmem at 4 GiB for the rest).
//!
//! This module owns the mappings, address translation, the write paths that mark pages dirty,
//! the chunk states of lazily restored memory (`lazy`), and copy-before-write for live snapshots (`cow`). It does not decide what to save or
//! send, and knows no files: `wire` and `digest` do the bulk work, `snapshot` reads checkpoint files, and
//! Python holds the policy.

mod address;
mod cow;
mod error;
mod guest;
mod install;
mod lazy;
mod prefault;
mod segment;
mod stream;

pub use address::{human_size, GuestAddress, PAGE_SHIFT, PAGE_SIZE};
pub use cow::{LiveCapture, LiveStats, TakenPage};
pub use error::MemoryError;
pub use guest::{GuestMemory, MemoryOptions, HIGHMEM_BASE, LAZY_KERNEL_TRACKING_COST, LOWMEM_LIMIT_DEFAULT};
pub use lazy::{ChunkFault, ChunkPart, ChunkSource, LazyImage, LazyStats, LoadOrigin, LoadPlan};
#[cfg(test)]
pub(crate) use prefault::INTERRUPT_EVERY;
pub(crate) use prefault::{interrupted, steps as populate_steps, PageChooser};
pub use prefault::{set_interrupt_check, PrefaultStats};
pub use segment::{Backing, InstallGuard, Segment, SegmentSpec};
pub(crate) use stream::{page_bytes, page_bytes_mut, stream_fence, stream_page, stream_pages, zeroed_pages, AlignedPage};

#[cfg(test)]
mod access_tests;
#[cfg(test)]
mod fill_tests;
#[cfg(test)]
mod install_tests;
#[cfg(test)]
mod lazy_tests;
#[cfg(test)]
mod memfd_tests;
#[cfg(test)]
mod prefault_tests;

/// For tests of long work that stops when the process is interrupted: the process's check
/// ([`set_interrupt_check`], set once) answers per thread, so no other test's work sees it.
#[cfg(test)]
pub(crate) mod interrupts_for_tests {
    thread_local! {
        static HERE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    fn here() -> bool {
        HERE.with(|h| h.get())
    }

    /// Whether this thread's long work from now on finds the process interrupted.
    pub(crate) fn interrupt_this_thread(on: bool) {
        // Only the first call in the process sets the check; every call sets the same one.
        let _ = super::set_interrupt_check(here);
        HERE.with(|h| h.set(on));
    }
}
