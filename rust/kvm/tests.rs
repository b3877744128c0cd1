//! The KVM backend against /dev/kvm: each test skips (printing why) where KVM cannot be opened.

use std::sync::Arc;

use super::*;
use crate::dirty::TrackingChoice;
use crate::memory::{GuestAddress, GuestMemory, MemoryOptions};

const CODE: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;

/// A guest that increments the u64 at DATA and then writes 'A' to COM1, forever.
const LOOP: [u8; 22] = [
    0x48, 0xb9, 0x00, 0x00, 0x20, 0x00, 0x00, 0x00, 0x00, 0x00, // mov rcx, 0x200000
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, 0x41, // mov al, 'A'
    0x48, 0xff, 0x01, // loop: inc qword [rcx]
    0xee, // out dx, al
    0xeb, 0xfa, // jmp loop
];

fn kvm_guest(memsize: u64) -> Option<(GuestMemory, KvmVcpu)> {
    kvm_guest_tracked(memsize, TrackingChoice::Kvm)
}

fn kvm_guest_tracked(memsize: u64, tracking: TrackingChoice) -> Option<(GuestMemory, KvmVcpu)> {
    let mem = match GuestMemory::new(&MemoryOptions { tracking, ..MemoryOptions::new(memsize) }) {
        Ok(mem) => mem,
        Err(e) => {
            eprintln!("skipped: KVM is not available here: {e}");
            return None;
        }
    };
    let vcpu = KvmVcpu::new(mem.kvm_vm().unwrap().clone(), 0).unwrap();
    mem.write(GuestAddress(CODE), &LOOP).unwrap();
    vcpu.enter_long_mode(&mem, CODE, CODE).unwrap();
    Some((mem, vcpu))
}

fn dirty_pages(mem: &GuestMemory) -> Vec<u64> {
    let mut words = vec![0u64; mem.segments()[0].pages().div_ceil(64)];
    mem.get_and_clear_dirty_segment(0, &mut words).unwrap();
    let mut pages = Vec::new();
    crate::dirty::bitmap_to_pages(&words, 0, &mut pages);
    pages
}

#[test]
fn guest_stores_are_in_the_dirty_log_and_come_back_each_round() {
    guest_stores_are_logged_each_round(TrackingChoice::Kvm);
}

#[test]
fn guest_stores_are_in_the_dirty_ring_and_come_back_each_round() {
    guest_stores_are_logged_each_round(TrackingChoice::KvmRing);
}

fn guest_stores_are_logged_each_round(tracking: TrackingChoice) {
    let Some((mem, vcpu)) = kvm_guest_tracked(8 << 20, tracking) else { return };
    let before = dirty_pages(&mem);
    assert!(before.contains(&(CODE / 4096)), "the VMM's own writes (the program) are marked: {before:?}");
    assert!(!before.contains(&(DATA / 4096)), "{before:?}");
    for round in 1..=3u64 {
        let exit = vcpu.run().unwrap();
        assert!(matches!(exit, KvmExit::Inout { port: 0x3f8, size: 1, is_in: false, value: 0x41, .. }), "{exit:?}");
        let mut counter = [0u8; 8];
        mem.read(GuestAddress(DATA), &mut counter).unwrap();
        assert_eq!(u64::from_le_bytes(counter), round);
        // The guest's store went through EPT/NPT only; no vmmpy path saw it.
        let pages = dirty_pages(&mem);
        assert!(pages.contains(&(DATA / 4096)), "round {round}: the guest's store is missing from {pages:?}");
        assert!(dirty_pages(&mem).is_empty(), "round {round}: a harvest clears");
    }
}

#[test]
fn a_pause_request_stops_a_running_vcpu_from_another_thread() {
    let Some((mem, vcpu)) = kvm_guest(4 << 20) else { return };
    // A guest that never exits by itself: jmp $.
    mem.write(GuestAddress(CODE), &[0xeb, 0xfe]).unwrap();
    let vcpu = Arc::new(vcpu);
    let runner = {
        let vcpu = vcpu.clone();
        std::thread::spawn(move || vcpu.run())
    };
    std::thread::sleep(std::time::Duration::from_millis(50));
    vcpu.request_pause();
    assert_eq!(runner.join().unwrap().unwrap(), KvmExit::PauseRequested);
    assert_eq!(vcpu.get_register("rip").unwrap(), CODE);
}

#[test]
fn saved_state_restores_into_a_fresh_vm_and_the_guest_goes_on() {
    let Some((mem, vcpu)) = kvm_guest(4 << 20) else { return };
    for _ in 0..5 {
        vcpu.run().unwrap();
    }
    let saved = vcpu.save_state().unwrap();
    let vm_saved = mem.kvm_vm().unwrap().save_state().unwrap();
    assert!(saved.msrs.iter().any(|&(i, v)| i == MSR_TSC && v > 0), "{:?}", saved.msrs);

    let (mem2, vcpu2) = kvm_guest(4 << 20).unwrap();
    let mut image = vec![0u8; 4 << 20];
    mem.read(GuestAddress(0), &mut image).unwrap();
    mem2.write(GuestAddress(0), &image).unwrap();
    mem2.kvm_vm().unwrap().restore_state(&vm_saved).unwrap();
    let tsc_continuous = vcpu2.restore_state(&saved).unwrap();
    eprintln!("TSC continuous after restore: {tsc_continuous} (false where the host's KVM cannot offset it)");
    assert_eq!(vcpu2.save_state().unwrap().regs, saved.regs);
    vcpu2.run().unwrap();
    let mut counter = [0u8; 8];
    mem2.read(GuestAddress(DATA), &mut counter).unwrap();
    assert_eq!(u64::from_le_bytes(counter), 6, "the restored guest goes on from its 5th increment");

    let short = KvmVcpuState { lapic: vec![0; 10], ..saved };
    let err = vcpu2.restore_state(&short).unwrap_err();
    assert!(err.0.contains("'lapic' is 10 bytes"), "{err}");
}

#[test]
fn an_unusable_dev_kvm_is_explained_with_the_fix() {
    let missing = super::vm::open_failure(libc::ENOENT);
    assert!(missing.starts_with("/dev/kvm does not exist on this host") && missing.contains("load kvm_intel or kvm_amd"), "{missing}");
    let denied = super::vm::open_failure(libc::EACCES);
    assert!(denied.contains("permission denied") && denied.contains("add the user to the group owning /dev/kvm"), "{denied}");
    for why in [missing, denied] {
        assert!(why.ends_with("run without --accel kvm to use the simulated vCPU"), "{why}");
    }
}

#[test]
fn a_full_dirty_ring_is_harvested_and_the_guest_goes_on_with_no_page_lost() {
    // More pages than the ring has entries (65,536 at most): the vCPU must stop at least once
    // with its ring full, be drained, and go on; the harvest after has every page.
    const PAGES: u64 = 80_000;
    let end = DATA + PAGES * 4096;
    // Unchecked: this test looks at what the ring does on this host, trusted or not.
    let Ok(mem) = GuestMemory::kvm_ring_unchecked(end + (2 << 20), RING_BYTES) else {
        eprintln!("skipped: KVM's dirty ring is not available here");
        return;
    };
    let vcpu = KvmVcpu::new(mem.kvm_vm().unwrap().clone(), 0).unwrap();
    vcpu.enter_long_mode(&mem, CODE, CODE).unwrap();
    assert_eq!(mem.backend(), crate::dirty::Backend::KvmRing);
    mem.write(GuestAddress(CODE), &super::probe::sweep_once(end)).unwrap();
    dirty_pages(&mem); // the VMM's own writes, before the guest runs
    let exit = vcpu.run().unwrap();
    assert!(matches!(exit, KvmExit::Inout { port: 0x3f8, size: 1, is_in: false, value: 0x42, .. }), "{exit:?}");
    let (entries, overflows) = mem.kvm_vm().unwrap().ring_stats().unwrap();
    assert!(entries < PAGES as u32, "the ring ({entries} entries) filled at least once");
    let mut words = vec![0u64; mem.segments()[0].pages().div_ceil(64)];
    let harvest = mem.get_and_clear_dirty_segment(0, &mut words);
    if overflows > 0 {
        // This host's KVM let the ring fill past its soft limit (a nested PVM host does): the
        // harvest refuses to vouch for what it holds, rather than miss a page.
        let err = harvest.unwrap_err().to_string();
        assert!(err.contains("dirty ring was found full") && err.contains("--dirty-tracking kvm"), "{err}");
        return;
    }
    harvest.unwrap();
    let mut pages = Vec::new();
    crate::dirty::bitmap_to_pages(&words, 0, &mut pages);
    let swept: Vec<u64> = (DATA / 4096..end / 4096).collect();
    let missing: Vec<&u64> = swept.iter().filter(|p| pages.binary_search(p).is_err()).take(5).collect();
    assert!(missing.is_empty(), "{} of {PAGES} swept pages reported; missing e.g. {missing:?}", pages.len());
    // Exactly the swept pages (and the page tables' accessed and dirty bits KVM writes).
    assert!(pages.len() < (PAGES + 64) as usize, "{} pages reported", pages.len());
    assert!(dirty_pages(&mem).is_empty(), "a harvest clears");
}
