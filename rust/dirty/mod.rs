//! EPT-like dirty tracking: one dirty bit per 4 KiB page, read and cleared atomically per round.
//!
//! Two backends behind one interface ([`DirtyTracker`]):
//! - `soft`: an atomic bitmap per segment, set by every write made through vmmpy (API writes,
//!   device DMA, vCPU stores). Always available.
//! - `kernel`: userfaultfd write-protect in async mode plus the PAGEMAP_SCAN ioctl (Linux 6.7+),
//!   which sees every write to the mapping, whoever makes it. The soft bitmap is still kept and
//!   OR'ed in, so the two backends report the same pages for writes made through vmmpy.
//!
//! This module knows nothing of segments' layout or of Python; `memory` owns the mappings.

mod bitmap;
mod kernel;

pub use bitmap::AtomicBitmap;
pub use kernel::{KernelTracker, KernelTrackerError};

use std::fmt;

/// Which backend a guest's memory uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Soft,
    Kernel,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Soft => "soft",
            Backend::Kernel => "kernel",
        })
    }
}

/// What the caller asked for: a backend, or "the best that works here".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrackingChoice {
    Auto,
    Soft,
    Kernel,
}

impl TrackingChoice {
    pub fn parse(s: &str) -> Option<TrackingChoice> {
        match s {
            "auto" => Some(TrackingChoice::Auto),
            "soft" => Some(TrackingChoice::Soft),
            "kernel" => Some(TrackingChoice::Kernel),
            _ => None,
        }
    }
}

/// Turn a dirty bitmap (bit i of word w = page w*64+i) into sorted page indices.
pub fn bitmap_to_pages(words: &[u64], first_page: u64, out: &mut Vec<u64>) {
    for (w, &word) in words.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let bit = bits.trailing_zeros() as u64;
            out.push(first_page + (w as u64) * 64 + bit);
            bits &= bits - 1;
        }
    }
}

/// Turn a dirty bitmap into (first_page, page_count) runs, in ascending order.
pub fn bitmap_to_runs(words: &[u64], first_page: u64, out: &mut Vec<(u64, u64)>) {
    let mut run: Option<(u64, u64)> = None;
    for (w, &word) in words.iter().enumerate() {
        if word == 0 {
            continue;
        }
        let base = first_page + (w as u64) * 64;
        let mut bits = word;
        while bits != 0 {
            let start = bits.trailing_zeros() as u64;
            let len = (!(bits >> start)).trailing_zeros() as u64; // ones from `start` upwards
            let page = base + start;
            match run.as_mut() {
                Some((first, count)) if *first + *count == page => *count += len,
                _ => {
                    if let Some(done) = run.take() {
                        out.push(done);
                    }
                    run = Some((page, len));
                }
            }
            bits = if start + len >= 64 { 0 } else { bits & !(((1u64 << len) - 1) << start) };
        }
    }
    if let Some(done) = run {
        out.push(done);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_and_runs_agree_with_the_bits() {
        let mut words = vec![0u64; 3];
        for p in [0u64, 1, 2, 63, 64, 65, 100, 191] {
            words[(p / 64) as usize] |= 1 << (p % 64);
        }
        let mut pages = Vec::new();
        bitmap_to_pages(&words, 1000, &mut pages);
        assert_eq!(pages, vec![1000, 1001, 1002, 1063, 1064, 1065, 1100, 1191]);
        let mut runs = Vec::new();
        bitmap_to_runs(&words, 1000, &mut runs);
        assert_eq!(runs, vec![(1000, 3), (1063, 3), (1100, 1), (1191, 1)]);
    }

    #[test]
    fn full_words_make_one_run() {
        let words = vec![u64::MAX; 4];
        let mut runs = Vec::new();
        bitmap_to_runs(&words, 0, &mut runs);
        assert_eq!(runs, vec![(0, 256)]);
    }
}
