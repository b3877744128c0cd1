//! `_core.KvmVcpu` and the KVM VM's state functions: the KVM backend for Python.
//!
//! `KvmVcpu` has the simulated `Vcpu`'s run/exit surface (`run`, `complete_read`,
//! `request_pause`, registers by name) so the VM's exit handling serves both. Its saved state is
//! a dict of the kernel's structs as bytes, MSRs by hex index, the MP state and TSC frequency.

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use super::cpu::PyVmExit;
use super::memory::PyGuestMemory;
use crate::kvm::{registers_of, KvmError, KvmVcpu, KvmVcpuState, KvmVm, KvmVmState};

fn kvm_error(err: KvmError) -> PyErr {
    if err.0.ends_with("is running") {
        return PyOSError::new_err((libc::EBUSY, err.0));
    }
    PyOSError::new_err((libc::EIO, err.0))
}

fn state_error(err: KvmError) -> PyErr {
    PyValueError::new_err(err.0)
}

fn vm_of(memory: &PyGuestMemory) -> PyResult<std::sync::Arc<KvmVm>> {
    memory.inner.kvm_vm().cloned().ok_or_else(|| {
        PyValueError::new_err(format!(
            "this guest memory's dirty tracking is '{}', not 'kvm': it is no KVM VM's memory",
            memory.inner.backend()
        ))
    })
}

#[pyclass(frozen, name = "KvmVcpu", module = "vmmpy._core")]
pub struct PyKvmVcpu {
    vcpu: KvmVcpu,
}

#[pymethods]
impl PyKvmVcpu {
    /// vCPU `vcpu_id` of the KVM VM whose memory slots `memory` is (memory made with
    /// `dirty_tracking="kvm"`).
    #[new]
    #[pyo3(signature = (memory, vcpu_id = 0))]
    fn new(memory: PyRef<'_, PyGuestMemory>, vcpu_id: u32) -> PyResult<PyKvmVcpu> {
        Ok(PyKvmVcpu { vcpu: KvmVcpu::new(vm_of(&memory)?, vcpu_id).map_err(kvm_error)? })
    }

    /// Run until an exit userspace must handle, with the GIL released.
    fn run(&self, py: Python<'_>) -> PyResult<PyVmExit> {
        let exit = py.detach(|| self.vcpu.run()).map_err(kvm_error)?;
        Ok(PyVmExit::from_kvm(exit))
    }

    /// Stop a running `run` (from any thread): it returns a "pause_requested" exit.
    fn request_pause(&self) {
        self.vcpu.request_pause();
    }

    fn complete_read(&self, value: u64) -> PyResult<()> {
        self.vcpu.complete_read(value).map_err(kvm_error)
    }

    fn get_register(&self, name: &str) -> PyResult<u64> {
        self.vcpu.get_register(name).map_err(|e| if e.0.contains("no register") { PyValueError::new_err(e.0) } else { kvm_error(e) })
    }

    fn set_register(&self, name: &str, value: u64) -> PyResult<()> {
        self.vcpu.set_register(name, value).map_err(|e| if e.0.contains("cannot set") { PyValueError::new_err(e.0) } else { kvm_error(e) })
    }

    /// Every register by name.
    fn registers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (name, value) in registers_of(&self.vcpu).map_err(kvm_error)? {
            d.set_item(name, value)?;
        }
        Ok(d)
    }

    /// Enter 64-bit long mode at `rip` with stack `rsp` (writes the GDT and identity page tables
    /// into `memory`, below 1 MiB).
    fn enter_long_mode(&self, memory: PyRef<'_, PyGuestMemory>, rip: u64, rsp: u64) -> PyResult<()> {
        self.vcpu.enter_long_mode(&memory.inner, rip, rsp).map_err(kvm_error)
    }

    #[getter]
    fn vcpu_id(&self) -> u32 {
        self.vcpu.id()
    }

    /// The vCPU's state: registers, special registers, XSAVE, XCRs, debug registers, local APIC
    /// and events as the kernel's structs' bytes; `msrs` (hex index -> value), `mp_state`,
    /// `tsc_khz`.
    fn save_state<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.vcpu.save_state().map_err(kvm_error)?;
        let d = PyDict::new(py);
        for (name, bytes) in [
            ("regs", &s.regs),
            ("sregs", &s.sregs),
            ("xsave", &s.xsave),
            ("xcrs", &s.xcrs),
            ("debugregs", &s.debugregs),
            ("lapic", &s.lapic),
            ("events", &s.events),
        ] {
            d.set_item(name, PyBytes::new(py, bytes))?;
        }
        let msrs = PyDict::new(py);
        for (index, value) in &s.msrs {
            msrs.set_item(format!("{index:#x}"), value)?;
        }
        d.set_item("msrs", msrs)?;
        d.set_item("mp_state", s.mp_state)?;
        d.set_item("tsc_khz", s.tsc_khz)?;
        Ok(d)
    }

    /// Load a state `save_state` gave (ValueError naming the piece that does not fit). Returns
    /// whether the guest's TSC goes on from its saved value (False where the host's KVM cannot
    /// offset the TSC).
    fn restore_state(&self, state: &Bound<'_, PyDict>) -> PyResult<bool> {
        let id = self.vcpu.id();
        let get = |key: &str| -> PyResult<Bound<'_, PyAny>> {
            state.get_item(key)?.ok_or_else(|| PyValueError::new_err(format!("vcpu {id}: saved KVM state has no '{key}'")))
        };
        let blob = |key: &str| -> PyResult<Vec<u8>> {
            get(key)?.extract::<Vec<u8>>().map_err(|_| PyValueError::new_err(format!("vcpu {id}: saved KVM state '{key}' must be bytes")))
        };
        let mut msrs = Vec::new();
        let msr_dict =
            get("msrs")?.cast_into::<PyDict>().map_err(|_| PyValueError::new_err(format!("vcpu {id}: 'msrs' must be a dict")))?;
        for (key, value) in msr_dict.iter() {
            let name: String = key.extract()?;
            let index = name
                .strip_prefix("0x")
                .and_then(|hex| u32::from_str_radix(hex, 16).ok())
                .ok_or_else(|| PyValueError::new_err(format!("vcpu {id}: MSR '{name}' is not a hex index like '0x10'")))?;
            let value: u64 =
                value.extract().map_err(|_| PyValueError::new_err(format!("vcpu {id}: MSR {name} must be a 64-bit unsigned value")))?;
            msrs.push((index, value));
        }
        let saved = KvmVcpuState {
            regs: blob("regs")?,
            sregs: blob("sregs")?,
            xsave: blob("xsave")?,
            xcrs: blob("xcrs")?,
            debugregs: blob("debugregs")?,
            lapic: blob("lapic")?,
            events: blob("events")?,
            mp_state: get("mp_state")?.extract().map_err(|_| PyValueError::new_err(format!("vcpu {id}: 'mp_state' must be an int")))?,
            msrs,
            tsc_khz: get("tsc_khz")?.extract().map_err(|_| PyValueError::new_err(format!("vcpu {id}: 'tsc_khz' must be an int")))?,
        };
        self.vcpu.restore_state(&saved).map_err(state_error)
    }

    fn __repr__(&self) -> String {
        format!("<KvmVcpu {}>", self.vcpu.id())
    }
}

/// Why KVM cannot be used here (with what to do), or None when it can.
#[pyfunction]
fn kvm_unavailable() -> Option<String> {
    KvmVm::open().err().map(|e| e.0)
}

/// Why KVM's dirty ring (`--dirty-tracking kvm-ring`) cannot be used here, or None when it can:
/// KVM missing, no ring offered, or a ring that does not keep its contract on this host (asked
/// once per process by running a small guest, `kvm::ring_trusted`).
#[pyfunction]
fn kvm_ring_unavailable(py: Python<'_>) -> Option<String> {
    if let Err(e) = KvmVm::open() {
        return Some(e.0);
    }
    py.detach(crate::kvm::ring_trusted).err().map(|e| e.0)
}

/// The KVM VM's interrupt controllers and kvmclock, as bytes by name.
#[pyfunction]
fn kvm_save_vm<'py>(py: Python<'py>, memory: PyRef<'_, PyGuestMemory>) -> PyResult<Bound<'py, PyDict>> {
    let s = vm_of(&memory)?.save_state().map_err(kvm_error)?;
    let d = PyDict::new(py);
    for (name, bytes) in [("pic_master", &s.pic_master), ("pic_slave", &s.pic_slave), ("ioapic", &s.ioapic), ("clock", &s.clock)] {
        d.set_item(name, PyBytes::new(py, bytes))?;
    }
    Ok(d)
}

#[pyfunction]
fn kvm_restore_vm(memory: PyRef<'_, PyGuestMemory>, state: &Bound<'_, PyDict>) -> PyResult<()> {
    let blob = |key: &str| -> PyResult<Vec<u8>> {
        state
            .get_item(key)?
            .ok_or_else(|| PyValueError::new_err(format!("saved KVM VM state has no '{key}'")))?
            .extract::<Vec<u8>>()
            .map_err(|_| PyValueError::new_err(format!("saved KVM VM state '{key}' must be bytes")))
    };
    let saved =
        KvmVmState { pic_master: blob("pic_master")?, pic_slave: blob("pic_slave")?, ioapic: blob("ioapic")?, clock: blob("clock")? };
    vm_of(&memory)?.restore_state(&saved).map_err(state_error)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyKvmVcpu>()?;
    m.add_function(wrap_pyfunction!(kvm_unavailable, m)?)?;
    m.add_function(wrap_pyfunction!(kvm_ring_unavailable, m)?)?;
    m.add_function(wrap_pyfunction!(kvm_save_vm, m)?)?;
    m.add_function(wrap_pyfunction!(kvm_restore_vm, m)?)?;
    Ok(())
}
