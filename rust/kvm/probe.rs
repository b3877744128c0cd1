//! Whether this host's KVM dirty ring can be trusted, asked once per process.
//!
//! The ring's contract is that KVM stops a vCPU (KVM_EXIT_DIRTY_RING_FULL) before its ring
//! fills, so no entry is ever overwritten. A host that breaks it loses guest writes and can leave
//! the vCPU stopping for ever (a nested PVM host, kvm_pvm, was seen doing both), so `kvm-ring`
//! is offered only where a small guest shows the contract kept, three times over: with a ring
//! of 4,096 entries it writes 12,288 pages without an exit of its own, and every drain must find
//! the ring short of full, every page must be reported, and the guest must reach its end within
//! a second. A host that passes and breaks the contract later is still caught: a harvest that
//! finds a ring full fails by name (`vm.rs`, `DirtyRings`).

use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use super::vcpu::{KvmExit, KvmVcpu};
use super::vm::KvmError;
use crate::memory::{GuestAddress, GuestMemory, PAGE_SIZE};

const RING_BYTES: u32 = 64 << 10; // 4,096 entries
const CODE: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const PAGES: u64 = 12_288;
const DEADLINE: Duration = Duration::from_secs(1);
const TRIALS: usize = 3;

/// Ok where the dirty ring keeps its contract here; otherwise why not, and what to use instead.
pub fn ring_trusted() -> Result<(), KvmError> {
    static ANSWER: OnceLock<Result<(), KvmError>> = OnceLock::new();
    // Three runs: a host that breaks the contract may do so only some of the time.
    ANSWER.get_or_init(|| (0..TRIALS).try_for_each(|_| probe())).clone()
}

/// A guest that increments one u64 in each page from DATA to `end`, then writes 'B' to COM1
/// and spins (`jmp $`).
pub(super) fn sweep_once(end: u64) -> Vec<u8> {
    let mut code = vec![0x48, 0xb9]; // mov rcx, DATA
    code.extend_from_slice(&DATA.to_le_bytes());
    code.extend_from_slice(&[0x48, 0xba]); // mov rdx, end
    code.extend_from_slice(&end.to_le_bytes());
    code.extend_from_slice(&[
        0x48, 0xff, 0x01, // loop: inc qword [rcx]
        0x48, 0x81, 0xc1, 0x00, 0x10, 0x00, 0x00, // add rcx, 0x1000
        0x48, 0x39, 0xd1, // cmp rcx, rdx
        0x72, 0xf1, // jb loop
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, 0x42, // mov al, 'B'
        0xee, // out dx, al
        0xeb, 0xfe, // jmp $
    ]);
    code
}

fn untrusted(why: String) -> KvmError {
    KvmError(format!(
        "this host's KVM dirty ring cannot be trusted: {why}; use --dirty-tracking kvm (KVM's dirty bitmap), which this host runs correctly"
    ))
}

fn probe() -> Result<(), KvmError> {
    let end = DATA + PAGES * PAGE_SIZE as u64;
    let memory = GuestMemory::kvm_ring_unchecked(end + (2 << 20), RING_BYTES).map_err(|e| KvmError(e.to_string()))?;
    let vm = memory.kvm_vm().expect("KVM memory has a VM").clone();
    let vcpu = Arc::new(KvmVcpu::new(vm.clone(), 0)?);
    memory.write(GuestAddress(CODE), &sweep_once(end)).map_err(|e| KvmError(e.to_string()))?;
    vcpu.enter_long_mode(&memory, CODE, CODE)?;
    let mut words = vec![0u64; memory.segments()[0].pages().div_ceil(64)];
    memory.get_and_clear_dirty_segment(0, &mut words).map_err(|e| KvmError(e.to_string()))?;
    let (tx, rx) = mpsc::channel();
    let runner = {
        let vcpu = vcpu.clone();
        std::thread::spawn(move || {
            let _ = tx.send(vcpu.run());
        })
    };
    let outcome = match rx.recv_timeout(DEADLINE) {
        Ok(result) => result,
        Err(_) => {
            vcpu.request_pause();
            let _ = rx.recv();
            Err(untrusted(format!(
                "a guest writing {PAGES} pages did not finish within {DEADLINE:?} (its vCPU kept stopping with its ring full)"
            )))
        }
    };
    let _ = runner.join();
    match outcome? {
        KvmExit::Inout { port: 0x3f8, value: 0x42, .. } => {}
        other => return Err(untrusted(format!("the probe guest stopped with {other:?}"))),
    }
    words.iter_mut().for_each(|w| *w = 0);
    let harvest = memory.get_and_clear_dirty_segment(0, &mut words);
    let (entries, overflows) = vm.ring_stats().expect("a ring VM");
    if overflows > 0 {
        return Err(untrusted(format!("KVM let a ring of {entries} entries fill instead of stopping the vCPU at its soft limit")));
    }
    harvest.map_err(|e| untrusted(e.to_string()))?;
    let first = (DATA / PAGE_SIZE as u64) as usize;
    let missing = (first..first + PAGES as usize).filter(|&p| words[p / 64] & (1 << (p % 64)) == 0).count();
    if missing > 0 {
        return Err(untrusted(format!("{missing} of {PAGES} pages a guest wrote were not in its ring")));
    }
    Ok(())
}
