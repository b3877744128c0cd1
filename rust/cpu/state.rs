//! The saved vCPU state: plain structs, separate from the live `Vcpu`, so a reader sees exactly
//! what is saved (`Vcpu::save_state` / `Vcpu::restore_state` fill and read them).
//!
//! The register file is saved in the vendor's layout, as bhyve's `vmx_snapshot_vcpu` and the SVM
//! snapshot do: Intel keeps rsp/rip/rflags/control registers in a VMCS and the other general
//! registers in `vmxctx`; AMD keeps rax and rsp with rip/rflags/control registers in the VMCB save
//! area, the other general registers in `swctx`, and the TSC offset in the VMCB control area.
//! Each flavour carries a field or two the other does not (Intel's `vpid`, AMD's `asid` and
//! `cpl`). A state of one vendor is never restored into a vCPU of the other.

use std::fmt;

/// Which layout a vCPU saves its state in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vendor {
    Intel,
    Amd,
}

impl Vendor {
    pub fn parse(s: &str) -> Option<Vendor> {
        match s {
            "intel" => Some(Vendor::Intel),
            "amd" => Some(Vendor::Amd),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Vendor::Intel => "intel",
            Vendor::Amd => "amd",
        }
    }
}

impl fmt::Display for Vendor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where the guest TSC comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TscMode {
    /// The host's monotonic clock in nanoseconds (a 1 GHz TSC) plus the offset.
    Host,
    /// Instructions retired plus the offset: fully deterministic.
    Instructions,
}

impl TscMode {
    pub fn parse(s: &str) -> Option<TscMode> {
        match s {
            "host" => Some(TscMode::Host),
            "instructions" => Some(TscMode::Instructions),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            TscMode::Host => "host",
            TscMode::Instructions => "instructions",
        }
    }
}

/// Declares a group of named u64 fields once, giving the struct, its field names in order, and
/// generic access by name (which the Python bindings use to build and read dicts).
macro_rules! field_group {
    ($(#[$meta:meta])* $name:ident { $($field:ident),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Debug, Default, PartialEq, Eq)]
        pub struct $name {
            $(pub $field: u64,)*
        }
        impl $name {
            pub const FIELDS: &'static [&'static str] = &[$(stringify!($field)),*];
            pub fn fields(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($field), self.$field)),*]
            }
            pub fn from_fields<E>(mut get: impl FnMut(&'static str) -> Result<u64, E>) -> Result<$name, E> {
                Ok($name { $($field: get(stringify!($field))?,)* })
            }
        }
    };
}

field_group!(
    /// The VMCS guest-state fields the simulated vCPU has (Intel SDM names, lower-cased).
    Vmcs {
        guest_rip, guest_rsp, guest_rflags, guest_cr0, guest_cr3, guest_cr4, guest_ia32_efer,
        guest_ia32_pat, guest_idtr_base, guest_fs_base, guest_gs_base, tsc_offset, vpid,
    }
);

field_group!(
    /// The general registers bhyve's `struct vmxctx` holds (everything but rsp, which the VMCS has).
    VmxCtx {
        guest_rax, guest_rcx, guest_rdx, guest_rbx, guest_rbp, guest_rsi, guest_rdi,
        guest_r8, guest_r9, guest_r10, guest_r11, guest_r12, guest_r13, guest_r14, guest_r15,
    }
);

field_group!(
    /// MSRs bhyve's VMX code saves and restores by hand around VM entry.
    IntelMsrs { kernel_gs_base, tsc_aux, apic_base }
);

field_group!(
    /// The VMCB save area (AMD APM names, lower-cased). `cpl` is always 0 here.
    VmcbSave {
        rip, rsp, rax, rflags, cr0, cr3, cr4, efer, g_pat, idtr_base, fs_base, gs_base,
        kernel_gs_base, cpl,
    }
);

field_group!(
    /// The VMCB control-area fields the simulated vCPU uses.
    VmcbControl { tsc_offset, asid }
);

field_group!(
    /// The general registers bhyve's `struct svm_regctx` (swctx) holds: all but rax and rsp.
    SvmSwCtx {
        sctx_rcx, sctx_rdx, sctx_rbx, sctx_rbp, sctx_rsi, sctx_rdi,
        sctx_r8, sctx_r9, sctx_r10, sctx_r11, sctx_r12, sctx_r13, sctx_r14, sctx_r15,
    }
);

field_group!(
    /// MSRs the SVM code keeps outside the VMCB.
    AmdMsrs { tsc_aux, apic_base }
);

/// The register file in one vendor's layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VendorState {
    Intel { vmcs: Vmcs, vmxctx: VmxCtx, guest_msrs: IntelMsrs },
    Amd { vmcb_save: VmcbSave, vmcb_control: VmcbControl, swctx: SvmSwCtx, guest_msrs: AmdMsrs },
}

impl VendorState {
    pub fn vendor(&self) -> Vendor {
        match self {
            VendorState::Intel { .. } => Vendor::Intel,
            VendorState::Amd { .. } => Vendor::Amd,
        }
    }

    /// The groups of this vendor's layout, by name, with their fields in declaration order.
    pub fn groups(&self) -> Vec<(&'static str, Vec<(&'static str, u64)>)> {
        match self {
            VendorState::Intel { vmcs, vmxctx, guest_msrs } => {
                vec![("vmcs", vmcs.fields()), ("vmxctx", vmxctx.fields()), ("guest_msrs", guest_msrs.fields())]
            }
            VendorState::Amd { vmcb_save, vmcb_control, swctx, guest_msrs } => vec![
                ("vmcb_save", vmcb_save.fields()),
                ("vmcb_control", vmcb_control.fields()),
                ("swctx", swctx.fields()),
                ("guest_msrs", guest_msrs.fields()),
            ],
        }
    }

    /// The group names a vendor's layout has, in order.
    pub fn group_names(vendor: Vendor) -> &'static [&'static str] {
        match vendor {
            Vendor::Intel => &["vmcs", "vmxctx", "guest_msrs"],
            Vendor::Amd => &["vmcb_save", "vmcb_control", "swctx", "guest_msrs"],
        }
    }

    /// Build a vendor's layout by asking `get(group, field)` for every field.
    pub fn from_groups<E>(vendor: Vendor, mut get: impl FnMut(&'static str, &'static str) -> Result<u64, E>) -> Result<VendorState, E> {
        Ok(match vendor {
            Vendor::Intel => VendorState::Intel {
                vmcs: Vmcs::from_fields(|f| get("vmcs", f))?,
                vmxctx: VmxCtx::from_fields(|f| get("vmxctx", f))?,
                guest_msrs: IntelMsrs::from_fields(|f| get("guest_msrs", f))?,
            },
            Vendor::Amd => VendorState::Amd {
                vmcb_save: VmcbSave::from_fields(|f| get("vmcb_save", f))?,
                vmcb_control: VmcbControl::from_fields(|f| get("vmcb_control", f))?,
                swctx: SvmSwCtx::from_fields(|f| get("swctx", f))?,
                guest_msrs: AmdMsrs::from_fields(|f| get("guest_msrs", f))?,
            },
        })
    }
}

/// Where a read the vCPU is waiting on comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadSource {
    Port(u16),
    Mmio(u64),
}

/// An `in` or MMIO load that exited and has not been completed: the instruction at rip has not
/// retired; `Vcpu::complete_read` writes the value into `dst` and retires it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingRead {
    pub source: ReadSource,
    /// 1, 2, 4 or 8 bytes.
    pub size: u8,
    /// The destination general register (0..16).
    pub dst: u8,
}

impl fmt::Display for PendingRead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dst = crate::cpu::isa::GPR_NAMES[self.dst as usize & 15];
        match self.source {
            ReadSource::Port(port) => write!(f, "in{} {dst} from port {port:#x}", self.size as u32 * 8),
            ReadSource::Mmio(gpa) => write!(f, "ld{} {dst} from mmio gpa {gpa:#x}", self.size as u32 * 8),
        }
    }
}

/// Everything a vCPU needs to continue exactly where it stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VcpuState {
    pub vcpu_id: u32,
    pub tsc_mode: TscMode,
    pub registers: VendorState,
    /// Interrupt vectors injected and not yet delivered: bit v of word v/64.
    pub pending_interrupts: [u64; 4],
    /// The vCPU executed `hlt` and has not been woken.
    pub halted: bool,
    pub pending_read: Option<PendingRead>,
    pub instructions_retired: u64,
    /// The guest TSC when the state was saved. A host-clock vCPU restores its offset from this so
    /// the TSC neither runs backwards nor jumps by the time spent suspended (bhyve's
    /// VM_RESTORE_TIME); an instruction-count vCPU must find it consistent with the offset.
    pub guest_tsc: u64,
}
