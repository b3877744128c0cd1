//! The KVM VM: /dev/kvm opened, one VM created with an in-kernel interrupt controller, guest
//! memory segments registered as memory slots over the mappings `memory` owns, and each slot's
//! dirty log behind the [`DirtyLog`] trait.

use std::fmt;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_dirty_log, kvm_enable_cap, kvm_userspace_memory_region, KVMIO, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::{ioctl_iow_nr, ioctl_iowr_nr};

use crate::dirty::{AtomicBitmap, Backend, DirtyLog, DirtyLogError};

// KVM_CLEAR_DIRTY_LOG: kvm-ioctls has no wrapper for it yet, so its number is declared here with
// vmm-sys-util's macro (include/uapi/linux/kvm.h: _IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)).
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
// KVM_GET_DIRTY_LOG into a bitmap the slot keeps (kvm-ioctls' wrapper allocates one per call,
// 2 MiB for 64 GiB, which a harvest of a clean guest would mostly spend faulting in).
ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);

/// Where KVM puts the TSS on Intel hosts (three pages in the 3-4 GiB hole, below the local APIC),
/// as Firecracker and QEMU do; no guest memory is there.
const TSS_ADDRESS: usize = 0xfffb_d000;

/// Why KVM cannot be used, with what to do about it.
#[derive(Debug, Clone)]
pub struct KvmError(pub String);

impl fmt::Display for KvmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for KvmError {}

fn failed(what: &str, err: kvm_ioctls::Error) -> KvmError {
    KvmError(format!("{what} failed: {err}"))
}

/// One KVM virtual machine.
pub struct KvmVm {
    pub(super) kvm: Kvm,
    pub(super) vm: VmFd,
}

impl KvmVm {
    /// Open /dev/kvm and create a VM with an in-kernel interrupt controller and manual dirty-log
    /// protection; or say why not and what to do.
    pub fn open() -> Result<KvmVm, KvmError> {
        let kvm = Kvm::new().map_err(|e| KvmError(open_failure(e.errno())))?;
        let api = kvm.get_api_version();
        if api != 12 {
            return Err(KvmError(format!("/dev/kvm speaks KVM API version {api}; vmmpy needs version 12")));
        }
        // The flags of manual protection this kernel offers (a bit mask; 0 = none).
        let manual = kvm.check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 as libc::c_ulong);
        if manual as u32 & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE == 0 {
            return Err(KvmError(
                "this kernel's KVM lacks KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (Linux 5.3+), which the dirty log needs".into(),
            ));
        }
        if !kvm.check_extension(Cap::Irqchip) || !kvm.check_extension(Cap::Xsave) || !kvm.check_extension(Cap::VcpuEvents) {
            return Err(KvmError(
                "this kernel's KVM lacks the in-kernel irqchip, XSAVE or vCPU-events support vmmpy saves state with".into(),
            ));
        }
        let vm = kvm.create_vm().map_err(|e| failed("KVM_CREATE_VM", e))?;
        let cap = kvm_enable_cap {
            cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            args: [KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE as u64, 0, 0, 0],
            ..Default::default()
        };
        vm.enable_cap(&cap).map_err(|e| failed("enabling manual dirty-log protection", e))?;
        vm.set_tss_address(TSS_ADDRESS).map_err(|e| failed("KVM_SET_TSS_ADDR", e))?;
        vm.create_irq_chip().map_err(|e| failed("KVM_CREATE_IRQCHIP", e))?;
        Ok(KvmVm { kvm, vm })
    }

    /// Register `size` bytes at host address `host` as memory slot `slot` at guest-physical
    /// `gpa`, with dirty logging on; the returned log is that slot's.
    ///
    /// # Safety
    /// `host..host+size` must stay mapped (or be unregistered with [`KvmVm::remove_slot`]) for
    /// as long as the VM can run.
    pub unsafe fn add_slot(self: &Arc<Self>, slot: u32, gpa: u64, host: *mut u8, size: usize) -> Result<KvmSlotLog, KvmError> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: gpa,
            memory_size: size as u64,
            userspace_addr: host as u64,
        };
        // SAFETY: the caller keeps the range mapped while the VM may use it.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(|e| failed(&format!("registering memory slot {slot} at {gpa:#x}"), e))?;
        let pages = size / crate::memory::PAGE_SIZE;
        Ok(KvmSlotLog { vm: self.clone(), slot, size, marks: AtomicBitmap::new(pages), scratch: Mutex::new(vec![0; pages.div_ceil(64)]) })
    }

    /// Unregister memory slot `slot` (before its mapping goes away).
    pub fn remove_slot(&self, slot: u32, gpa: u64) {
        let region = kvm_userspace_memory_region { slot, flags: 0, guest_phys_addr: gpa, memory_size: 0, userspace_addr: 0 };
        // SAFETY: a size of 0 deletes the slot; no memory is referenced. Failure leaves the slot,
        // which then faults (EFAULT from KVM_RUN) rather than touching anything else.
        let _ = unsafe { self.vm.set_user_memory_region(region) };
    }
}

/// Why /dev/kvm could not be opened (`errno` of the open), and what to do.
pub(super) fn open_failure(errno: i32) -> String {
    match errno {
        libc::ENOENT | libc::ENODEV | libc::ENXIO => "/dev/kvm does not exist on this host: there is no KVM here (load kvm_intel or \
kvm_amd, or give this machine nested virtualization); run without --accel kvm to use the simulated vCPU"
            .into(),
        libc::EACCES | libc::EPERM => "/dev/kvm is not permitted to this user (permission denied): add the user to the group owning \
/dev/kvm (usually 'kvm') or run as root; run without --accel kvm to use the simulated vCPU"
            .into(),
        e => format!("/dev/kvm cannot be opened: {}", std::io::Error::from_raw_os_error(e)),
    }
}

/// The dirty log of one memory slot: what the guest wrote (KVM's dirty log, harvested with
/// KVM_GET_DIRTY_LOG and re-protected with KVM_CLEAR_DIRTY_LOG) OR'ed with what vmmpy wrote
/// from userspace (a soft bitmap: KVM never sees those writes).
///
/// Harvest order: get KVM's bits, then clear exactly those bits. A guest write between the two
/// either lands on a page already reported (sent with its bytes read after the harvest) or on a
/// page whose bit is not in the clear mask, so it stays set for the next harvest: nothing lost.
pub struct KvmSlotLog {
    vm: Arc<KvmVm>,
    slot: u32,
    size: usize,
    marks: AtomicBitmap,
    /// KVM's bitmap of the slot, as the last KVM_GET_DIRTY_LOG wrote it.
    scratch: Mutex<Vec<u64>>,
}

impl KvmSlotLog {
    fn error(&self, what: &str, err: kvm_ioctls::Error) -> DirtyLogError {
        DirtyLogError { backend: Backend::Kvm, why: format!("{what} of memory slot {} failed: {err}", self.slot) }
    }

    /// KVM's dirty bits of the slot, not cleared, into the slot's bitmap (held while the
    /// guard lives, so two harvests never interleave their get and clear).
    fn kvm_bits(&self) -> Result<std::sync::MutexGuard<'_, Vec<u64>>, DirtyLogError> {
        let mut bits = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        let mut arg = kvm_dirty_log { slot: self.slot, ..Default::default() };
        arg.__bindgen_anon_1.dirty_bitmap = bits.as_mut_ptr() as *mut libc::c_void;
        // SAFETY: the bitmap holds one bit per page of the slot and outlives the call.
        if unsafe { ioctl_with_ref(&self.vm.vm, KVM_GET_DIRTY_LOG(), &arg) } < 0 {
            return Err(self.error("KVM_GET_DIRTY_LOG", kvm_ioctls::Error::last()));
        }
        Ok(bits)
    }

    /// Clear (and write-protect again) the pages whose bits are set in `bits`.
    fn clear(&self, bits: &mut [u64]) -> Result<(), DirtyLogError> {
        if bits.iter().all(|&w| w == 0) {
            return Ok(());
        }
        let mut arg = kvm_clear_dirty_log { slot: self.slot, num_pages: self.pages() as u32, first_page: 0, ..Default::default() };
        arg.__bindgen_anon_1.dirty_bitmap = bits.as_mut_ptr() as *mut libc::c_void;
        // SAFETY: the bitmap covers num_pages bits and outlives the call; KVM only reads it.
        let ret = unsafe { ioctl_with_ref(&self.vm.vm, KVM_CLEAR_DIRTY_LOG(), &arg) };
        if ret < 0 {
            return Err(self.error("KVM_CLEAR_DIRTY_LOG", kvm_ioctls::Error::last()));
        }
        Ok(())
    }
}

impl DirtyLog for KvmSlotLog {
    fn backend(&self) -> Backend {
        Backend::Kvm
    }

    fn pages(&self) -> usize {
        self.size / crate::memory::PAGE_SIZE
    }

    fn mark(&self, first: usize, end: usize) {
        self.marks.mark(first, end);
    }

    fn get_and_clear(&self, words: &mut [u64]) -> Result<usize, DirtyLogError> {
        let mut bits = self.kvm_bits()?;
        self.clear(&mut bits)?;
        self.marks.get_and_clear(words)?;
        let mut count = 0;
        for (w, k) in words.iter_mut().zip(bits.iter()) {
            *w |= k;
            count += w.count_ones() as usize;
        }
        Ok(count)
    }

    fn peek(&self, words: &mut [u64]) -> Result<(), DirtyLogError> {
        let bits = self.kvm_bits()?;
        self.marks.peek(words)?;
        for (w, k) in words.iter_mut().zip(bits.iter()) {
            *w |= k;
        }
        Ok(())
    }

    fn forget_unmarked(&self, first: usize, end: usize) -> Result<(), DirtyLogError> {
        // KVM sees only what the guest writes; userspace restore writes never reach its log. But
        // pages the guest wrote in the range are, by this call's contract, to be forgotten.
        let mut bits = self.kvm_bits()?;
        for (w, word) in bits.iter_mut().enumerate() {
            for bit in 0..64 {
                let page = w * 64 + bit;
                if page < first || page >= end {
                    *word &= !(1u64 << bit);
                }
            }
        }
        self.clear(&mut bits)
    }
}
