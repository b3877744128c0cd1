//! Populating a destination's memory while it waits: every eligible page comes to be there,
//! no byte and no dirty bit changes, stopping is prompt, and what may not be populated is not.

use super::*;
use crate::dirty::TrackingChoice;
use crate::memory::interrupts_for_tests::interrupt_this_thread;

const MIB: u64 = 1 << 20;

fn memory(size: u64, wired: bool) -> GuestMemory {
    let mut opts = MemoryOptions::new(size);
    opts.wired = wired;
    GuestMemory::new(&opts).unwrap()
}

#[test]
fn a_whole_population_makes_every_page_resident_and_changes_no_byte_nor_dirty_bit() {
    let mem = memory(64 * MIB, false);
    let seg = mem.segments()[0].clone();
    // Pages written before: their bytes must survive; the bitmap is cleared so that any dirty bit
    // after comes from the population.
    mem.write(GuestAddress(5 * 4096 + 7), b"kept").unwrap();
    mem.write(GuestAddress(40 * MIB), &[0xa5; 4096]).unwrap();
    let mut words = vec![0u64; seg.pages().div_ceil(64)];
    mem.get_and_clear_dirty_segment(0, &mut words).unwrap();
    assert!(seg.mapped_pages().unwrap() < seg.pages());
    assert!(seg.all_resident(&[(5, 1)]) && !seg.all_resident(&[(5, 1), (6, 1)]), "a page not there yet spoils the runs");

    assert_eq!(mem.start_prefault().unwrap(), 64 * MIB);
    assert!(mem.start_prefault().is_err(), "a second population while one runs is refused");
    // Wait (bounded) until the thread is done, then collect its figures.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while seg.mapped_pages().unwrap() < seg.pages() && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let stats = mem.stop_prefault().expect("a population ran");
    assert!(!stats.stopped && stats.refused.is_none(), "{stats:?}");
    assert_eq!((stats.bytes, stats.target_bytes), (64 * MIB, 64 * MIB));
    assert!(stats.seconds > 0.0 && stats.cpu_seconds >= 0.0, "{stats:?}");
    assert_eq!(seg.mapped_pages().unwrap(), seg.pages(), "every page is there");
    assert!(seg.all_resident(&[(0, seg.pages())]));
    assert!(seg.all_resident(&[(3, 2), (100, 1)]) && !seg.all_resident(&[]) && !seg.all_resident(&[(0, seg.pages() + 1)]));

    let mut out = [0u8; 4];
    mem.read(GuestAddress(5 * 4096 + 7), &mut out).unwrap();
    assert_eq!(&out, b"kept");
    let mut page = vec![0u8; 4096];
    mem.read(GuestAddress(40 * MIB), &mut page).unwrap();
    assert!(page.iter().all(|&b| b == 0xa5));
    mem.read(GuestAddress(63 * MIB), &mut page).unwrap();
    assert!(page.iter().all(|&b| b == 0), "a populated page reads as zero");
    assert_eq!(mem.dirty_count().unwrap(), 0, "populating marks nothing dirty");
    assert!(mem.stop_prefault().is_none(), "nothing runs any more");
    // The thread timed whole steps on both kinds of page where it could take huge ones (and
    // told the segment which came cheaper), and only on small ones where it could not.
    assert!(stats.huge_bytes.is_multiple_of(super::prefault::STEP as u64) && stats.huge_bytes <= stats.bytes, "{stats:?}");
    if seg.receives_huge() {
        assert!(stats.huge_bytes > 0 && stats.huge_bytes < stats.bytes, "huge pages timed first, then small: {stats:?}");
    } else {
        assert_eq!(stats.huge_bytes, 0);
    }
}

/// Whole steps timed at `small` and `huge` seconds: which kind each of the steps took.
fn choices(steps: usize, cost: impl Fn(usize, bool) -> f64) -> Vec<bool> {
    choices_of(super::prefault::PageChooser::default(), steps, cost)
}

/// The same, by a chooser for wiring memory (tries of the dearer kind spread by its cost).
fn wiring_choices(steps: usize, cost: impl Fn(usize, bool) -> f64) -> Vec<bool> {
    choices_of(super::prefault::PageChooser::wiring(), steps, cost)
}

fn choices_of(mut chooser: super::prefault::PageChooser, steps: usize, cost: impl Fn(usize, bool) -> f64) -> Vec<bool> {
    (0..steps)
        .map(|i| {
            let huge = chooser.huge_next();
            chooser.timed(huge, cost(i, huge));
            huge
        })
        .collect()
}

/// Indices from the fifth step on (after the two of each kind that come first) where `taken`
/// took huge pages (`huge`) or small ones.
fn tries(taken: &[bool], huge: bool) -> Vec<usize> {
    taken.iter().enumerate().filter(|&(i, &h)| i >= 4 && h == huge).map(|(i, _)| i).collect()
}

#[test]
fn the_population_takes_the_page_size_it_times_cheaper_and_keeps_trying_the_other() {
    // Where huge pages are the cheaper (most hosts): two steps of each kind, alternating, then
    // huge pages, with one small step after every 15 huge ones.
    let taken = choices(64, |_, huge| if huge { 0.0002 } else { 0.0009 });
    assert_eq!(&taken[..5], &[true, false, true, false, true]);
    assert_eq!(tries(&taken, false), [19, 35, 51]);
    // Equal costs: huge pages (one fault per 2 MiB for the guest later too), tried the same way.
    assert_eq!(tries(&choices(64, |_, _| 0.001), false), [19, 35, 51]);
    // The verdict the receiver follows says nothing against huge pages until two of each were
    // timed, however slow the first huge step was.
    let mut chooser = super::prefault::PageChooser::default();
    for (huge, seconds) in [(true, 0.05), (false, 0.0009), (true, 0.0002)] {
        chooser.timed(huge, seconds);
        assert!(chooser.huge_cheaper(), "after {chooser:?}");
    }
    chooser.timed(false, 0.0009);
    assert!(chooser.huge_cheaper(), "two of each: huge, at 0.0002 against 0.0009");
    chooser.timed(false, 0.0001);
    assert!(!chooser.huge_cheaper(), "small came cheaper");
    // Where the host took the memory back from whole free 2 MiB blocks: small pages after the
    // first four steps, with one huge step after every 15 small ones (the fourth step counts).
    let taken = choices(64, |_, huge| if huge { 0.008 } else { 0.0009 });
    assert_eq!(&taken[..5], &[true, false, true, false, false]);
    assert_eq!(tries(&taken, true), [18, 34, 50]);
    // When the kind taken grows dear halfway (small pages, once the fragments the host backs are
    // used up), its own next steps show it, and the other is taken within a few steps.
    let taken = choices(96, |i, huge| match (huge, i < 32) {
        (true, _) => 0.004,
        (false, true) => 0.0009,
        (false, false) => 0.02,
    });
    assert!(taken[4..32].iter().filter(|&&h| h).count() <= 2, "small while they are cheap: {taken:?}");
    assert!(taken[36..].iter().filter(|&&h| !h).count() <= 4, "huge once small ones grew dear: {taken:?}");
    // When the kind not taken grows cheap halfway (huge pages, once memory freed a moment ago is
    // there to take), only the try of it sees it: huge from the first try after, step 34, on.
    let taken = choices(96, |i, huge| match (huge, i < 32) {
        (true, true) => 0.008,
        (true, false) => 0.0004,
        (false, _) => 0.0009,
    });
    assert_eq!(tries(&taken[..34], true), [18], "small until huge is tried again: {taken:?}");
    assert!(taken[34] && taken[35..].iter().filter(|&&h| !h).count() <= 4, "huge from the try on: {taken:?}");
    // One slow step (the thread preempted) does not flip the choice by itself.
    let taken = choices(48, |i, huge| {
        if i == 20 {
            0.05
        } else if huge {
            0.0002
        } else {
            0.0009
        }
    });
    assert_eq!(tries(&taken, false), [19, 35], "{taken:?}");
}

#[test]
fn wiring_tries_the_dearer_kind_as_much_further_apart_as_it_is_dearer() {
    // Equal costs: as a population, one small step after every 15 huge ones.
    assert_eq!(tries(&wiring_choices(64, |_, _| 0.001), false), [19, 35, 51]);
    // Small pages 4.5 times dearer: tried 5 times further apart, after 75 huge steps in a row.
    let taken = wiring_choices(200, |_, huge| if huge { 0.0002 } else { 0.0009 });
    assert_eq!(&taken[..5], &[true, false, true, false, true]);
    assert_eq!(tries(&taken, false), [79, 155]);
    // Huge pages nearly 9 times dearer (a host that took its memory back): after 135 small
    // steps in a row (the fourth step counts). Trying costs about a sixteenth of the time, as
    // where the two cost the same.
    let taken = wiring_choices(300, |_, huge| if huge { 0.008 } else { 0.0009 });
    assert_eq!(&taken[..5], &[true, false, true, false, false]);
    assert_eq!(tries(&taken, true), [138, 274]);
    // A kind more than 16 times dearer is still tried after 240 steps in a row.
    assert_eq!(tries(&wiring_choices(500, |_, huge| if huge { 0.1 } else { 0.0009 }), true), [243, 484]);
    // The kind taken growing dear is still seen by its own steps at once.
    let taken = wiring_choices(96, |i, huge| match (huge, i < 32) {
        (true, _) => 0.004,
        (false, true) => 0.0009,
        (false, false) => 0.02,
    });
    assert!(taken[4..32].iter().all(|&h| !h) && taken[35..].iter().all(|&h| h), "{taken:?}");
}

/// Every segment of a guest, the ones a population did not reach too, is told which kind came
/// cheaper, whatever it held before: the receiver reads it there. The population is stopped
/// early, while still in lowmem as a rule (where it stops does not change what must hold).
#[test]
fn every_segment_is_told_the_populations_verdict() {
    let opts = MemoryOptions {
        memsize: 264 * MIB,
        wired: false,
        lowmem_limit: 8 * MIB,
        tracking: TrackingChoice::Soft,
        backing: Backing::Anonymous,
    };
    let mem = GuestMemory::new(&opts).unwrap();
    assert_eq!(mem.segments().len(), 2, "lowmem and highmem");
    let lowmem = mem.segments()[0].clone();
    for before in [false, true] {
        for seg in mem.segments() {
            seg.set_huge_cheaper(before);
        }
        let population = super::prefault::Prefault::start(mem.segments().to_vec(), 0);
        let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while lowmem.mapped_pages().unwrap() < lowmem.pages() && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let stats = population.finish();
        assert!(stats.bytes >= 8 * MIB, "{stats:?}");
        for seg in mem.segments() {
            assert_eq!(seg.huge_cheaper(), stats.huge_cheaper, "{} after {before} ({stats:?})", seg.name());
        }
        // Drop the pages, so that the second population starts from fresh memory again.
        for seg in mem.segments() {
            // SAFETY: the whole mapping of a segment we hold; MADV_DONTNEED on private anonymous
            // memory only drops pages (they read as zero again), and no view of them is held.
            unsafe { libc::madvise(seg.as_ptr() as *mut libc::c_void, seg.size(), libc::MADV_DONTNEED) };
        }
    }
    assert!(super::prefault::PrefaultStats::default().huge_cheaper, "nothing timed: huge pages not found dearer");
}

#[test]
fn stopping_a_population_takes_effect_within_a_step_and_close_stops_one_too() {
    // 4 GiB, never touched (NORESERVE): far more than one step, stopped at once.
    let mem = memory(4096 * MIB, false);
    assert_eq!(mem.start_prefault().unwrap(), 4096 * MIB);
    let stats = mem.stop_prefault().unwrap();
    assert!(stats.stopped, "{stats:?}");
    assert!(stats.bytes < stats.target_bytes && stats.bytes.is_multiple_of(4096), "{stats:?}");
    // Steps end at 2 MiB addresses: the populated part of the first segment ends at one.
    let first = &mem.segments()[0];
    let populated = (stats.bytes as usize).min(first.size());
    assert!(
        populated == 0 || populated == first.size() || (first.as_ptr() as usize + populated).is_multiple_of(super::prefault::STEP),
        "{stats:?}"
    );
    let resident: usize = mem.segments().iter().map(|s| s.mapped_pages().unwrap()).sum();
    assert_eq!(resident as u64 * 4096, stats.bytes, "exactly the steps it finished are there");

    let mem = memory(4096 * MIB, false);
    mem.start_prefault().unwrap();
    mem.close().unwrap();
    assert!(mem.stop_prefault().is_none(), "close stopped it");
}

#[test]
fn a_population_stops_before_it_would_leave_the_host_short_of_memory() {
    // A reserve no host has: the first step would cross it, so nothing is populated.
    let mem = memory(64 * MIB, false);
    let stats = super::prefault::Prefault::start(mem.segments().to_vec(), u64::MAX / 2).wait();
    assert!(stats.stopped && stats.short_of_memory.is_some_and(|left| left > 0), "{stats:?}");
    assert_eq!((stats.bytes, stats.target_bytes), (0, 64 * MIB));
    assert_eq!(mem.segments()[0].mapped_pages().unwrap(), 0);
    // The real reserve leaves this test's 64 MiB well inside what the host has.
    let stats = super::prefault::Prefault::start(mem.segments().to_vec(), super::prefault::reserve()).wait();
    assert!(!stats.stopped && stats.short_of_memory.is_none() && stats.bytes == 64 * MIB, "{stats:?}");
    assert_eq!(mem.segments()[0].mapped_pages().unwrap(), mem.segments()[0].pages());
}

#[test]
fn memory_larger_than_the_host_has_available_is_not_populated_at_all() {
    // Twice the host's memory, never touched (NORESERVE): refused up front, with the figures.
    let size = (super::segment::physical_memory() * 2).next_multiple_of(1 << 30);
    let mem = memory(size, false);
    let err = mem.start_prefault().unwrap_err().to_string();
    assert!(err.starts_with("populating ") && err.contains("of guest memory ahead would leave the host less than"), "{err}");
    assert!(err.contains("MemAvailable"), "{err}");
    assert!(mem.stop_prefault().is_none(), "no thread was started");
    let resident: usize = mem.segments().iter().map(|s| s.mapped_pages().unwrap()).sum();
    assert_eq!(resident, 0);
}

#[test]
fn wired_and_kernel_tracked_memory_is_not_populated() {
    let mem = memory(16 * MIB, true);
    assert_eq!(mem.start_prefault().unwrap(), 0, "wired memory is populated (and locked) up front already");
    assert!(mem.stop_prefault().is_none());

    let mut opts = MemoryOptions::new(16 * MIB);
    opts.tracking = TrackingChoice::Kernel;
    if let Ok(mem) = GuestMemory::new(&opts) {
        assert_eq!(mem.start_prefault().unwrap(), 0, "a write-protect registration sends write faults to its handler");
        assert_eq!(mem.segments()[0].mapped_pages().unwrap(), 0);
    }
}

#[test]
fn a_populations_steps_cover_the_range_and_end_at_2_mib_addresses() {
    let mem = memory(16 * MIB, false);
    let seg = &mem.segments()[0];
    let step = super::prefault::STEP;
    for (off, len) in [(0, 16 * MIB as usize), (3 * 4096, 5 * MIB as usize), (2 * MIB as usize, 4096), (7 * 4096, 0)] {
        let steps: Vec<(usize, usize)> = super::prefault::steps(seg, off, len).collect();
        assert_eq!(steps.iter().map(|s| s.1).sum::<usize>(), len, "{off} {len}");
        let mut at = off;
        for (i, &(o, l)) in steps.iter().enumerate() {
            assert!(o == at && l > 0 && l <= step, "contiguous steps of at most 2 MiB: {steps:?}");
            at += l;
            let end = seg.as_ptr() as usize + at;
            assert!(i == steps.len() - 1 || end.is_multiple_of(step), "each but the last ends at a 2 MiB address: {steps:?}");
        }
    }
}

/// Wiring a large guest takes seconds: an interrupt (Ctrl-C, through the embedder's check) stops
/// it at the first check, with an error that says how far it got. Without an interrupt the same
/// guest wires whole.
#[test]
fn wiring_stops_at_its_first_check_when_the_process_is_interrupted_and_says_how_far_it_got() {
    let check = INTERRUPT_EVERY as u64 * 2 * MIB; // populated by the first check, on 2 MiB-aligned memory
    interrupt_this_thread(true);
    let mut opts = MemoryOptions::new(8 * check);
    opts.wired = true;
    let err = GuestMemory::new(&opts).map(|_| ()).unwrap_err();
    interrupt_this_thread(false);
    assert!(matches!(err, MemoryError::Interrupted { .. }), "{err}");
    assert_eq!(err.errno(), libc::EINTR);
    let text = err.to_string();
    let done = text.strip_prefix("wiring 512 MiB for segment 'lowmem' was interrupted after ").expect(&text);
    // Where the mapping is not 2 MiB-aligned (kernels before 6.7) the first step is shorter.
    let mib: f64 = done.strip_suffix(" MiB").expect(&text).parse().expect(&text);
    assert!((check / MIB - 2) as f64 <= mib && mib <= (check / MIB) as f64, "{text}");
    let mem = GuestMemory::new(&opts).unwrap();
    assert_eq!(mem.wiring().unwrap().bytes, 8 * check, "not interrupted: all of it");
}
