//! Saving and restoring a KVM guest's CPU and interrupt-controller state.
//!
//! Each piece is the kernel's own struct (the x86-64 KVM ABI, fixed by Linux's uapi headers) as
//! its bytes, so the saved state is exactly what KVM_GET_* gave and KVM_SET_* takes. A piece of
//! the wrong length is refused naming it; what the bytes mean KVM checks on KVM_SET_* (EINVAL).
//! MSRs are (index, value) pairs, for the MSRs this host's KVM can save ([`SAVED_MSRS`]).
//!
//! The TSC stays continuous: its MSR is restored to the saved value, so the guest's TSC goes on
//! from where it stopped (never backwards, never jumping by the time spent stopped), and the
//! saved TSC frequency is set on the destination (KVM_SET_TSC_KHZ) when it differs.

use kvm_bindings::{
    kvm_device_attr, kvm_irqchip, kvm_msr_entry, Msrs, KVMIO, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET,
};
use kvm_ioctls::VcpuFd;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

use super::vcpu::KvmVcpu;
use super::vm::{KvmError, KvmVm};

/// The MSRs saved with each vCPU (those of them the host's KVM lists): the TSC, SYSENTER, the
/// syscall MSRs, KERNEL_GS_BASE, TSC_AUX, PAT, the TSC deadline, MISC_ENABLE.
pub const SAVED_MSRS: [u32; 13] =
    [0x10, 0x174, 0x175, 0x176, 0xc000_0081, 0xc000_0082, 0xc000_0083, 0xc000_0084, 0xc000_0102, 0xc000_0103, 0x277, 0x6e0, 0x1a0];
/// IA32_TSC.
pub const MSR_TSC: u32 = 0x10;

// The vCPU device-attribute ioctls, which kvm-ioctls wraps only on other architectures: the TSC
// offset is one (include/uapi/linux/kvm.h).
ioctl_iow_nr!(KVM_SET_DEVICE_ATTR, KVMIO, 0xe1, kvm_device_attr);
ioctl_iow_nr!(KVM_GET_DEVICE_ATTR, KVMIO, 0xe2, kvm_device_attr);
ioctl_iow_nr!(KVM_HAS_DEVICE_ATTR, KVMIO, 0xe3, kvm_device_attr);

/// One vCPU's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmVcpuState {
    pub regs: Vec<u8>,
    pub sregs: Vec<u8>,
    pub xsave: Vec<u8>,
    pub xcrs: Vec<u8>,
    pub debugregs: Vec<u8>,
    pub lapic: Vec<u8>,
    pub events: Vec<u8>,
    pub mp_state: u32,
    pub msrs: Vec<(u32, u64)>,
    pub tsc_khz: u32,
}

/// The VM's interrupt controllers (the two 8259s, the I/O APIC) and kvmclock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmVmState {
    pub pic_master: Vec<u8>,
    pub pic_slave: Vec<u8>,
    pub ioapic: Vec<u8>,
    pub clock: Vec<u8>,
}

fn bytes_of<T>(value: &T) -> Vec<u8> {
    // SAFETY: T is one of KVM's plain C structs (no pointers): its bytes are its value.
    unsafe { std::slice::from_raw_parts(value as *const T as *const u8, std::mem::size_of::<T>()) }.to_vec()
}

fn from_bytes<T>(bytes: &[u8], what: &str) -> Result<T, KvmError> {
    if bytes.len() != std::mem::size_of::<T>() {
        return Err(KvmError(format!(
            "saved KVM state '{what}' is {} bytes; this host's struct is {}",
            bytes.len(),
            std::mem::size_of::<T>()
        )));
    }
    // SAFETY: KVM's structs are plain C data, valid for any bytes; the length was checked.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const T) })
}

fn failed(id: u32, what: &str, err: kvm_ioctls::Error) -> KvmError {
    KvmError(format!("vcpu {id}: {what} failed: {err}"))
}

impl KvmVcpu {
    /// The vCPU's whole state; refused while it runs.
    pub fn save_state(&self) -> Result<KvmVcpuState, KvmError> {
        let id = self.id();
        let inner = self.lock().ok_or_else(|| KvmError(format!("vcpu {id} is running")))?;
        let fd = &inner.fd;
        let indices = saved_msr_indices(&self.vm)?;
        let entries: Vec<kvm_msr_entry> = indices.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| KvmError(format!("vcpu {id}: MSR list: {e:?}")))?;
        let read = fd.get_msrs(&mut msrs).map_err(|e| failed(id, "KVM_GET_MSRS", e))?;
        if read != indices.len() {
            return Err(KvmError(format!(
                "vcpu {id}: KVM_GET_MSRS read {read} of {} MSRs (stopped at {:#x})",
                indices.len(),
                indices[read]
            )));
        }
        Ok(KvmVcpuState {
            regs: bytes_of(&fd.get_regs().map_err(|e| failed(id, "KVM_GET_REGS", e))?),
            sregs: bytes_of(&fd.get_sregs().map_err(|e| failed(id, "KVM_GET_SREGS", e))?),
            xsave: bytes_of(&fd.get_xsave().map_err(|e| failed(id, "KVM_GET_XSAVE", e))?),
            xcrs: bytes_of(&fd.get_xcrs().map_err(|e| failed(id, "KVM_GET_XCRS", e))?),
            debugregs: bytes_of(&fd.get_debug_regs().map_err(|e| failed(id, "KVM_GET_DEBUGREGS", e))?),
            lapic: bytes_of(&fd.get_lapic().map_err(|e| failed(id, "KVM_GET_LAPIC", e))?),
            events: bytes_of(&fd.get_vcpu_events().map_err(|e| failed(id, "KVM_GET_VCPU_EVENTS", e))?),
            mp_state: fd.get_mp_state().map_err(|e| failed(id, "KVM_GET_MP_STATE", e))?.mp_state,
            msrs: msrs.as_slice().iter().map(|e| (e.index, e.data)).collect(),
            tsc_khz: fd.get_tsc_khz().map_err(|e| failed(id, "KVM_GET_TSC_KHZ", e))?,
        })
    }

    /// Load a saved state (every piece checked for length first, so a bad one changes nothing of
    /// ours; KVM checks the contents). Returns whether the guest's TSC now goes on from its saved
    /// value: false on a host whose KVM cannot offset the TSC (the guest then sees the host's).
    pub fn restore_state(&self, state: &KvmVcpuState) -> Result<bool, KvmError> {
        let id = self.id();
        let regs: kvm_bindings::kvm_regs = from_bytes(&state.regs, "regs")?;
        let sregs: kvm_bindings::kvm_sregs = from_bytes(&state.sregs, "sregs")?;
        let xsave: kvm_bindings::kvm_xsave = from_bytes(&state.xsave, "xsave")?;
        let xcrs: kvm_bindings::kvm_xcrs = from_bytes(&state.xcrs, "xcrs")?;
        let debugregs: kvm_bindings::kvm_debugregs = from_bytes(&state.debugregs, "debugregs")?;
        let lapic: kvm_bindings::kvm_lapic_state = from_bytes(&state.lapic, "lapic")?;
        let events: kvm_bindings::kvm_vcpu_events = from_bytes(&state.events, "events")?;
        let entries: Vec<kvm_msr_entry> =
            state.msrs.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
        let msrs = Msrs::from_entries(&entries).map_err(|e| KvmError(format!("vcpu {id}: saved MSRs: {e:?}")))?;
        let inner = self.lock().ok_or_else(|| KvmError(format!("vcpu {id} is running")))?;
        let fd = &inner.fd;
        let host_khz = fd.get_tsc_khz().map_err(|e| failed(id, "KVM_GET_TSC_KHZ", e))?;
        if state.tsc_khz != 0 && state.tsc_khz != host_khz {
            fd.set_tsc_khz(state.tsc_khz).map_err(|e| {
                KvmError(format!(
                    "vcpu {id}: the guest's TSC ran at {} kHz, this host's at {host_khz} kHz, and KVM_SET_TSC_KHZ failed: {e}",
                    state.tsc_khz
                ))
            })?;
        }
        fd.set_mp_state(kvm_bindings::kvm_mp_state { mp_state: state.mp_state }).map_err(|e| failed(id, "KVM_SET_MP_STATE", e))?;
        fd.set_regs(&regs).map_err(|e| failed(id, "KVM_SET_REGS", e))?;
        fd.set_sregs(&sregs).map_err(|e| failed(id, "KVM_SET_SREGS", e))?;
        // SAFETY: a kvm_xsave of exactly the legacy 4 KiB size, which is all KVM_SET_XSAVE reads
        // for a guest without dynamically enabled (AMX) state, which ours never have.
        unsafe { fd.set_xsave(&xsave) }.map_err(|e| failed(id, "KVM_SET_XSAVE", e))?;
        fd.set_xcrs(&xcrs).map_err(|e| failed(id, "KVM_SET_XCRS", e))?;
        fd.set_debug_regs(&debugregs).map_err(|e| failed(id, "KVM_SET_DEBUGREGS", e))?;
        fd.set_lapic(&lapic).map_err(|e| failed(id, "KVM_SET_LAPIC", e))?;
        let written = fd.set_msrs(&msrs).map_err(|e| failed(id, "KVM_SET_MSRS", e))?;
        if written != entries.len() {
            return Err(KvmError(format!(
                "vcpu {id}: KVM_SET_MSRS wrote {written} of {} MSRs (refused {:#x})",
                entries.len(),
                entries[written].index
            )));
        }
        fd.set_vcpu_events(&events).map_err(|e| failed(id, "KVM_SET_VCPU_EVENTS", e))?;
        match state.msrs.iter().find(|&&(index, _)| index == MSR_TSC) {
            Some(&(_, saved)) => keep_tsc(fd, id, saved, state.tsc_khz.max(1)),
            None => Ok(true),
        }
    }
}

fn guest_tsc(fd: &VcpuFd, id: u32) -> Result<u64, KvmError> {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry { index: MSR_TSC, ..Default::default() }])
        .map_err(|e| KvmError(format!("vcpu {id}: MSR list: {e:?}")))?;
    fd.get_msrs(&mut msrs).map_err(|e| failed(id, "KVM_GET_MSRS (TSC)", e))?;
    Ok(msrs.as_slice()[0].data)
}

/// Make the guest's TSC read `saved` now. KVM_SET_MSRS of IA32_TSC (above) is not enough:
/// KVM takes a write within a second of what it expects as a synchronization and keeps its own
/// value. So where KVM offers the vCPU's TSC offset (KVM_VCPU_TSC_CTRL, Linux 5.16+) it is moved
/// by what is missing. Then the TSC is read back: whether it is within a second of `saved`.
fn keep_tsc(fd: &VcpuFd, id: u32, saved: u64, tsc_khz: u32) -> Result<bool, KvmError> {
    let offset = std::cell::Cell::new(0u64);
    let attr = kvm_device_attr { flags: 0, group: KVM_VCPU_TSC_CTRL, attr: KVM_VCPU_TSC_OFFSET as u64, addr: offset.as_ptr() as u64 };
    // SAFETY (each ioctl below): `attr.addr` points at `offset`, a u64 that outlives the call.
    if unsafe { ioctl_with_ref(fd, KVM_HAS_DEVICE_ATTR(), &attr) } == 0 {
        if unsafe { ioctl_with_ref(fd, KVM_GET_DEVICE_ATTR(), &attr) } < 0 {
            return Err(failed(id, "KVM_GET_DEVICE_ATTR (TSC offset)", kvm_ioctls::Error::last()));
        }
        let now = guest_tsc(fd, id)?;
        offset.set(offset.get().wrapping_add(saved.wrapping_sub(now)));
        if unsafe { ioctl_with_ref(fd, KVM_SET_DEVICE_ATTR(), &attr) } < 0 {
            return Err(failed(id, "KVM_SET_DEVICE_ATTR (TSC offset)", kvm_ioctls::Error::last()));
        }
    }
    let now = guest_tsc(fd, id)?;
    Ok(now.wrapping_sub(saved) < tsc_khz as u64 * 1000)
}

/// The MSRs of [`SAVED_MSRS`] this host's KVM can save, in that order.
fn saved_msr_indices(vm: &KvmVm) -> Result<Vec<u32>, KvmError> {
    let list = vm.kvm.get_msr_index_list().map_err(|e| KvmError(format!("KVM_GET_MSR_INDEX_LIST failed: {e}")))?;
    let offered = list.as_slice();
    Ok(SAVED_MSRS.iter().copied().filter(|i| offered.contains(i)).collect())
}

impl KvmVm {
    fn irqchip(&self, chip_id: u32) -> Result<kvm_irqchip, KvmError> {
        let mut chip = kvm_irqchip { chip_id, ..Default::default() };
        self.vm.get_irqchip(&mut chip).map_err(|e| KvmError(format!("KVM_GET_IRQCHIP {chip_id} failed: {e}")))?;
        Ok(chip)
    }

    /// The interrupt controllers and kvmclock.
    pub fn save_state(&self) -> Result<KvmVmState, KvmError> {
        Ok(KvmVmState {
            pic_master: bytes_of(&self.irqchip(KVM_IRQCHIP_PIC_MASTER)?),
            pic_slave: bytes_of(&self.irqchip(KVM_IRQCHIP_PIC_SLAVE)?),
            ioapic: bytes_of(&self.irqchip(KVM_IRQCHIP_IOAPIC)?),
            clock: bytes_of(&self.vm.get_clock().map_err(|e| KvmError(format!("KVM_GET_CLOCK failed: {e}")))?),
        })
    }

    pub fn restore_state(&self, state: &KvmVmState) -> Result<(), KvmError> {
        let chips: [kvm_irqchip; 3] = [
            from_bytes(&state.pic_master, "pic_master")?,
            from_bytes(&state.pic_slave, "pic_slave")?,
            from_bytes(&state.ioapic, "ioapic")?,
        ];
        let mut clock: kvm_bindings::kvm_clock_data = from_bytes(&state.clock, "clock")?;
        for (chip, want) in chips.iter().zip([KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC]) {
            if chip.chip_id != want {
                return Err(KvmError(format!("saved KVM irqchip {want} says it is chip {}", chip.chip_id)));
            }
            self.vm.set_irqchip(chip).map_err(|e| KvmError(format!("KVM_SET_IRQCHIP {want} failed: {e}")))?;
        }
        // Only the clock value is set (not the host-time fields KVM_GET_CLOCK reported).
        clock.flags = 0;
        self.vm.set_clock(&clock).map_err(|e| KvmError(format!("KVM_SET_CLOCK failed: {e}")))
    }
}
