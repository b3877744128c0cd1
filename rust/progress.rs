//! A progress meter: counters a long call (a round's page batches, a checkpoint memory write or
//! read) advances as it goes, and another thread reads while the call runs with the GIL released.
//!
//! The call advances it once per window, piece or batch (a relaxed atomic add each, never per
//! page) and sets the totals once it knows them; a reader sees each counter at some moment, never
//! a torn value. Nothing here decides what the figures mean to a user (rates, estimates: Python).

use std::sync::atomic::{AtomicU64, Ordering};

/// What a call has done so far and what it will do in all. "Pages" are every page the call covers
/// (data, zero or untouched), "data pages" those whose bytes it moves, "bytes" what it put on the
/// wire or in the file (or took from them). A total is 0 until the call knows it.
#[derive(Debug, Default)]
pub struct Meter {
    pages_total: AtomicU64,
    data_pages_total: AtomicU64,
    pages_done: AtomicU64,
    data_pages_done: AtomicU64,
    bytes_done: AtomicU64,
}

/// One reading of a [`Meter`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reading {
    pub pages_total: u64,
    pub data_pages_total: u64,
    pub pages_done: u64,
    pub data_pages_done: u64,
    pub bytes_done: u64,
}

impl Meter {
    pub fn new() -> Meter {
        Meter::default()
    }

    /// The call will cover `pages` more pages, `data_pages` of them with their bytes.
    pub fn add_total(&self, pages: u64, data_pages: u64) {
        self.pages_total.fetch_add(pages, Ordering::Relaxed);
        self.data_pages_total.fetch_add(data_pages, Ordering::Relaxed);
    }

    /// `pages` more pages done (`data_pages` of them data), and `bytes` moved.
    pub fn advance(&self, pages: u64, data_pages: u64, bytes: u64) {
        if pages != 0 {
            self.pages_done.fetch_add(pages, Ordering::Relaxed);
        }
        if data_pages != 0 {
            self.data_pages_done.fetch_add(data_pages, Ordering::Relaxed);
        }
        if bytes != 0 {
            self.bytes_done.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    pub fn read(&self) -> Reading {
        Reading {
            pages_total: self.pages_total.load(Ordering::Relaxed),
            data_pages_total: self.data_pages_total.load(Ordering::Relaxed),
            pages_done: self.pages_done.load(Ordering::Relaxed),
            data_pages_done: self.data_pages_done.load(Ordering::Relaxed),
            bytes_done: self.bytes_done.load(Ordering::Relaxed),
        }
    }
}

/// Advance `meter` when there is one.
pub fn advance(meter: Option<&Meter>, pages: u64, data_pages: u64, bytes: u64) {
    if let Some(m) = meter {
        m.advance(pages, data_pages, bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_and_progress_add_up_across_threads() {
        let meter = Meter::new();
        meter.add_total(100, 60);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..5 {
                        meter.advance(5, 3, 4096 * 3);
                    }
                });
            }
        });
        assert_eq!(
            meter.read(),
            Reading { pages_total: 100, data_pages_total: 60, pages_done: 100, data_pages_done: 60, bytes_done: 60 * 4096 }
        );
        advance(None, 1, 1, 1);
        advance(Some(&meter), 0, 0, 7);
        assert_eq!(meter.read().bytes_done, 60 * 4096 + 7);
    }
}
