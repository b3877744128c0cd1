//! The KVM VM: /dev/kvm opened, one VM created with an in-kernel interrupt controller, guest
//! memory segments registered as memory slots over the mappings `memory` owns, and each slot's
//! dirty log behind the [`DirtyLog`] trait: KVM's dirty bitmap (`kvm`) or its dirty ring
//! (`kvm-ring`, [`DirtyRings`]).

use std::collections::HashMap;
use std::fmt;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_dirty_gfn, kvm_dirty_log, kvm_enable_cap, kvm_userspace_memory_region, KVMIO, KVM_CAP_DIRTY_LOG_RING,
    KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_DIRTY_LOG_PAGE_OFFSET,
    KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vmm_sys_util::ioctl::{ioctl, ioctl_with_ref};
use vmm_sys_util::{ioctl_io_nr, ioctl_iow_nr, ioctl_iowr_nr};

use crate::dirty::{AtomicBitmap, Backend, DirtyLog, DirtyLogError};

// KVM_CLEAR_DIRTY_LOG: kvm-ioctls has no wrapper for it yet, so its number is declared here with
// vmm-sys-util's macro (include/uapi/linux/kvm.h: _IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)).
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
// KVM_GET_DIRTY_LOG into a bitmap the slot keeps (kvm-ioctls' wrapper allocates one per call,
// 2 MiB for 64 GiB, which a harvest of a clean guest would mostly spend faulting in).
ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
// KVM_RESET_DIRTY_RINGS: re-protect the pages whose ring entries userspace marked harvested
// (_IO(KVMIO, 0xc7)); kvm-ioctls has no wrapper for the dirty ring.
ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);

/// The dirty ring asked for, in bytes, or the largest the kernel takes if smaller (16 bytes an
/// entry: 65,536 entries, 256 MiB of guest writes between two harvests before a vCPU must stop
/// for one).
pub const RING_BYTES: u32 = 1 << 20;

/// KVM's exit reason when a vCPU's dirty ring is full (KVM_EXIT_DIRTY_RING_FULL): the VMM must
/// harvest and reset the rings before the vCPU can run again.
pub(super) const EXIT_DIRTY_RING_FULL: u32 = 31;
/// A ring entry's flags (kvm_dirty_gfn.flags; the bindings have only their mask): DIRTY, set by
/// KVM when it publishes the entry; RESET, set by userspace when it has harvested it.
const DIRTY_GFN_F_DIRTY: u32 = 1;
const DIRTY_GFN_F_RESET: u32 = 2;

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

/// How a KVM VM's guest writes are logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyMode {
    /// KVM_GET_DIRTY_LOG with manual protect, then KVM_CLEAR_DIRTY_LOG: a bitmap per slot.
    Bitmap,
    /// The dirty ring (KVM_CAP_DIRTY_LOG_RING): each vCPU appends the pages it dirties to a ring
    /// shared with userspace; a harvest reads the entries since the last and resets them.
    Ring,
}

/// One KVM virtual machine.
pub struct KvmVm {
    pub(super) kvm: Kvm,
    pub(super) vm: VmFd,
    /// With [`DirtyMode::Ring`]: the vCPUs' rings and where their entries go.
    pub(super) rings: Option<DirtyRings>,
}

impl KvmVm {
    /// Open /dev/kvm and create a VM with an in-kernel interrupt controller and KVM's dirty
    /// bitmap log (manual protect); or say why not and what to do.
    pub fn open() -> Result<KvmVm, KvmError> {
        Self::open_with(DirtyMode::Bitmap, 0)
    }

    /// As [`KvmVm::open`], logging guest writes as `mode` says, with rings of at most
    /// `ring_bytes` (the ring is refused, saying so, where this kernel's KVM does not offer it).
    pub fn open_with(mode: DirtyMode, ring_bytes: u32) -> Result<KvmVm, KvmError> {
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
        let rings = match mode {
            DirtyMode::Bitmap => {
                let cap = kvm_enable_cap {
                    cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                    args: [KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE as u64, 0, 0, 0],
                    ..Default::default()
                };
                vm.enable_cap(&cap).map_err(|e| failed("enabling manual dirty-log protection", e))?;
                None
            }
            DirtyMode::Ring => Some(DirtyRings::enable(&kvm, &vm, ring_bytes)?),
        };
        vm.set_tss_address(TSS_ADDRESS).map_err(|e| failed("KVM_SET_TSS_ADDR", e))?;
        vm.create_irq_chip().map_err(|e| failed("KVM_CREATE_IRQCHIP", e))?;
        Ok(KvmVm { kvm, vm, rings })
    }

    pub fn dirty_mode(&self) -> DirtyMode {
        if self.rings.is_some() {
            DirtyMode::Ring
        } else {
            DirtyMode::Bitmap
        }
    }

    /// With the dirty ring: (entries per vCPU ring, drains that found a ring full and so
    /// counted every page as written). None with the bitmap.
    pub fn ring_stats(&self) -> Option<(u32, u64)> {
        self.rings.as_ref().map(|r| (r.entries, r.overflows.load(Ordering::Relaxed)))
    }

    /// With the dirty ring: move every vCPU's new entries into their slots' logs and reset
    /// them (so the pages are write-protected again). Returns how many entries there were.
    /// For a vCPU whose ring is full: it goes on whatever was found (a harvest reports it).
    pub fn drain_rings(&self) -> Result<usize, DirtyLogError> {
        match &self.rings {
            Some(rings) => rings.drain(&self.vm),
            None => Ok(0),
        }
    }

    /// As [`KvmVm::drain_rings`], for a harvest: fails, saying why, once a ring has been found
    /// full, since entries may have been lost (every page is still counted as written).
    fn harvest_rings(&self) -> Result<usize, DirtyLogError> {
        match &self.rings {
            Some(rings) => rings.harvest(&self.vm),
            None => Ok(0),
        }
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
        let seen = match &self.rings {
            Some(rings) => {
                let seen = Arc::new(AtomicBitmap::new(pages));
                rings.lock().slots.insert(slot, seen.clone());
                Some(seen)
            }
            None => None,
        };
        Ok(KvmSlotLog {
            vm: self.clone(),
            slot,
            size,
            marks: AtomicBitmap::new(pages),
            scratch: Mutex::new(vec![0; if seen.is_some() { 0 } else { pages.div_ceil(64) }]),
            seen,
        })
    }

    /// Unregister memory slot `slot` (before its mapping goes away).
    pub fn remove_slot(&self, slot: u32, gpa: u64) {
        let region = kvm_userspace_memory_region { slot, flags: 0, guest_phys_addr: gpa, memory_size: 0, userspace_addr: 0 };
        // SAFETY: a size of 0 deletes the slot; no memory is referenced. Failure leaves the slot,
        // which then faults (EFAULT from KVM_RUN) rather than touching anything else.
        let _ = unsafe { self.vm.set_user_memory_region(region) };
        if let Some(rings) = &self.rings {
            rings.lock().slots.remove(&slot);
        }
    }
}

/// The dirty rings of a VM's vCPUs (KVM_CAP_DIRTY_LOG_RING, Documentation/virt/kvm/api.rst).
///
/// Each vCPU has a ring of `kvm_dirty_gfn` entries mapped from its file; KVM appends (slot,
/// page) with the DIRTY flag as the guest first writes a write-protected page. A drain walks each
/// ring from where the last stopped while entries carry DIRTY (read with acquire), sets the
/// page's bit in its slot's `seen` bitmap, flags the entry RESET (release), then asks
/// KVM_RESET_DIRTY_RINGS to write-protect those pages again and free the entries.
///
/// Nothing is lost: a page's bit is set before the harvest that reports it returns, and its bytes
/// are read after. A guest write after the drain saw the entry but before the reset re-protects the
/// page reaches memory before that read; one after the reset faults and makes a new entry. A full
/// ring stops its vCPU (KVM_EXIT_DIRTY_RING_FULL), whose run loop drains and goes on.
pub(super) struct DirtyRings {
    entries: u32,
    state: Mutex<RingState>,
    /// Drains that found a ring full (so every page was counted as written).
    overflows: AtomicU64,
}

#[derive(Default)]
pub(super) struct RingState {
    /// Per vCPU id: its mapped ring and the index of the next entry to read.
    rings: HashMap<u32, RingMap>,
    /// Per memory slot: the pages the rings reported.
    slots: HashMap<u32, Arc<AtomicBitmap>>,
}

struct RingMap {
    base: *mut kvm_dirty_gfn,
    bytes: usize,
    next: u32,
}

// SAFETY: the mapping is the vCPU file's ring, shared with KVM by design; it is only read and
// written under the state lock, with the atomic accesses KVM's protocol asks for on `flags`.
unsafe impl Send for RingMap {}

impl Drop for RingMap {
    fn drop(&mut self) {
        // SAFETY: `base..base+bytes` is the mapping made in `add_vcpu`, not used after this.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.bytes) };
    }
}

impl DirtyRings {
    fn enable(kvm: &Kvm, vm: &VmFd, ring_bytes: u32) -> Result<DirtyRings, KvmError> {
        // ACQ_REL is the ring with the memory ordering every architecture needs; plain RING is
        // the x86-only original. Either answers with the largest ring size it takes, in bytes.
        let (cap, max) = [KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING]
            .into_iter()
            .map(|cap| (cap, kvm.check_extension_raw(cap as libc::c_ulong)))
            .find(|&(_, max)| max > 0)
            .ok_or_else(|| {
                KvmError(
                    "this kernel's KVM offers no dirty ring (KVM_CAP_DIRTY_LOG_RING, Linux 5.11+): use --dirty-tracking kvm \
(KVM's dirty bitmap)"
                        .into(),
                )
            })?;
        let bytes = (max as u32).min(ring_bytes);
        let enable = kvm_enable_cap { cap, args: [bytes as u64, 0, 0, 0], ..Default::default() };
        vm.enable_cap(&enable).map_err(|e| failed(&format!("enabling the dirty ring ({bytes} bytes)"), e))?;
        Ok(DirtyRings {
            entries: bytes / std::mem::size_of::<kvm_dirty_gfn>() as u32,
            state: Mutex::new(RingState::default()),
            overflows: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RingState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Map vCPU `id`'s ring from its file `fd`.
    pub(super) fn add_vcpu(&self, id: u32, fd: &impl AsRawFd) -> Result<(), KvmError> {
        let bytes = self.entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        let offset = KVM_DIRTY_LOG_PAGE_OFFSET as libc::off_t * crate::memory::PAGE_SIZE as libc::off_t;
        // SAFETY: a new shared mapping of the vCPU file's ring area, which KVM sized for this VM.
        let base = unsafe {
            libc::mmap(std::ptr::null_mut(), bytes, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd.as_raw_fd(), offset)
        };
        if base == libc::MAP_FAILED {
            return Err(KvmError(format!("vcpu {id}: mapping its dirty ring failed: {}", std::io::Error::last_os_error())));
        }
        self.lock().rings.insert(id, RingMap { base: base as *mut kvm_dirty_gfn, bytes, next: 0 });
        Ok(())
    }

    /// Drain vCPU `id`'s ring into the slots' logs and unmap it (before its file is closed).
    pub(super) fn remove_vcpu(&self, id: u32, vm: &VmFd) {
        let _ = self.drain(vm);
        self.lock().rings.remove(&id);
    }

    /// The harvest's drain: as [`DirtyRings::drain`], failing once a ring has been found full.
    fn harvest(&self, vm: &VmFd) -> Result<usize, DirtyLogError> {
        let total = self.drain(vm)?;
        let overflows = self.overflows.load(Ordering::Relaxed);
        if overflows > 0 {
            return Err(DirtyLogError {
                backend: Backend::KvmRing,
                why: format!(
                    "a vCPU's dirty ring was found full ({} entries): this host's KVM did not stop the vCPU at the ring's \
soft limit, so guest writes may have gone unrecorded; the dirty ring cannot be trusted on this host \
(use --dirty-tracking kvm, KVM's dirty bitmap)",
                    self.entries
                ),
            });
        }
        Ok(total)
    }

    fn drain(&self, vm: &VmFd) -> Result<usize, DirtyLogError> {
        let mut state = self.lock();
        let RingState { rings, slots } = &mut *state;
        let mut total = 0;
        let mut overflowed = false;
        for ring in rings.values_mut() {
            let mut taken = 0u32;
            loop {
                // SAFETY: the index is reduced modulo the ring's entries, inside the mapping.
                let entry = unsafe { ring.base.add((ring.next % self.entries) as usize) };
                // SAFETY: `flags` is a u32 in the shared mapping, which KVM writes concurrently:
                // read and written only atomically, as the ring's protocol says.
                let flags = unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*entry).flags)) };
                if flags.load(Ordering::Acquire) & DIRTY_GFN_F_DIRTY == 0 {
                    break;
                }
                // SAFETY: KVM wrote slot and offset before publishing DIRTY (acquired above).
                let (slot, page) = unsafe { ((*entry).slot & 0xffff, (*entry).offset as usize) };
                if let Some(seen) = slots.get(&slot).filter(|seen| page < seen.pages()) {
                    seen.set(page);
                }
                flags.store(DIRTY_GFN_F_RESET, Ordering::Release);
                ring.next = ring.next.wrapping_add(1);
                taken += 1;
                total += 1;
                if taken == self.entries {
                    break;
                }
            }
            // KVM stops a vCPU before its ring fills (a soft limit below the size). A ring found
            // full means that did not happen, and entries may have been overwritten or dropped
            // (seen on this project's nested PVM host): which pages were written is unknown from
            // now on, so every page counts as written, and every harvest from now on fails
            // saying why (a migration then fails and its source keeps the guest).
            overflowed |= taken == self.entries;
        }
        if overflowed {
            self.overflows.fetch_add(1, Ordering::Relaxed);
        }
        if self.overflows.load(Ordering::Relaxed) > 0 {
            for seen in slots.values() {
                seen.set_range(0, seen.pages());
            }
        }
        if total > 0 {
            // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument.
            if unsafe { ioctl(vm, KVM_RESET_DIRTY_RINGS()) } < 0 {
                return Err(DirtyLogError {
                    backend: Backend::KvmRing,
                    why: format!("KVM_RESET_DIRTY_RINGS failed: {}", std::io::Error::last_os_error()),
                });
            }
        }
        Ok(total)
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
///
/// With the dirty ring the guest's writes come from the rings instead ([`DirtyRings`]): each
/// harvest drains them into `seen` first, then reads and clears `seen` and `marks` together.
pub struct KvmSlotLog {
    vm: Arc<KvmVm>,
    slot: u32,
    size: usize,
    marks: AtomicBitmap,
    /// KVM's bitmap of the slot, as the last KVM_GET_DIRTY_LOG wrote it (bitmap mode).
    scratch: Mutex<Vec<u64>>,
    /// The pages the dirty rings reported and no harvest has taken yet (ring mode).
    seen: Option<Arc<AtomicBitmap>>,
}

impl KvmSlotLog {
    fn error(&self, what: &str, err: kvm_ioctls::Error) -> DirtyLogError {
        DirtyLogError { backend: self.backend(), why: format!("{what} of memory slot {} failed: {err}", self.slot) }
    }

    /// Ring mode: the rings drained, the slot's reported pages (None in bitmap mode).
    fn drained(&self) -> Result<Option<&AtomicBitmap>, DirtyLogError> {
        match &self.seen {
            Some(seen) => {
                self.vm.harvest_rings()?;
                Ok(Some(seen))
            }
            None => Ok(None),
        }
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
        if self.seen.is_some() {
            Backend::KvmRing
        } else {
            Backend::Kvm
        }
    }

    fn pages(&self) -> usize {
        self.size / crate::memory::PAGE_SIZE
    }

    fn mark(&self, first: usize, end: usize) {
        self.marks.mark(first, end);
    }

    fn get_and_clear(&self, words: &mut [u64]) -> Result<usize, DirtyLogError> {
        if let Some(seen) = self.drained()? {
            // Both OR into `words`: a page the VMM and the guest both wrote counts once.
            self.marks.get_and_clear_into(words);
            seen.get_and_clear_into(words);
            return Ok(words.iter().map(|w| w.count_ones() as usize).sum());
        }
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
        if let Some(seen) = self.drained()? {
            self.marks.peek_into(words);
            seen.peek_into(words);
            return Ok(());
        }
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
        if let Some(seen) = self.drained()? {
            seen.clear_range(first, end.min(seen.pages()));
            return Ok(());
        }
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
