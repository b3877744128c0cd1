//! `_core.Vcpu` and `_core.VmExit`: the simulated vCPU for Python.
//!
//! `Vcpu` is frozen: its register file sits behind a mutex that `run` holds (with the GIL
//! released) for as long as the guest executes, so any other call that needs the register file
//! while it runs fails at once with OSError(EBUSY) "vcpu N is running" instead of waiting.
//! `request_pause` and `inject_interrupt` need no lock and work from any thread at any time.
//! The saved state is a plain dict (docs/isa.md, "Saved state").

use std::sync::{Mutex, MutexGuard, TryLockError};

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use super::memory::PyGuestMemory;
use crate::cpu::isa::{self, GPR_NAMES};
use crate::cpu::{vectors_of, CpuError, Exit, PendingRead, ReadSource, TscMode, Vcpu, VcpuHandle, VcpuState, Vendor, VendorState};

/// Version of the dict `save_state` produces; `restore_state` refuses any other.
const STATE_FORMAT: u64 = 1;

fn cpu_error(err: CpuError) -> PyErr {
    match err {
        CpuError::MemoryClosed { .. } => PyOSError::new_err((libc::EBADF, err.to_string())),
        CpuError::MemoryUnavailable { .. } => super::errors::LazyMemoryError::new_err((libc::EIO, err.to_string())),
        CpuError::ReadPending { .. } | CpuError::NoReadPending { .. } => PyOSError::new_err((libc::EINVAL, err.to_string())),
        _ => PyValueError::new_err(err.to_string()),
    }
}

/// One exit, as bhyve's `struct vm_exit`: `kind` says which fields mean something; the others
/// are None.
#[pyclass(frozen, eq, name = "VmExit", module = "vmmpy._core")]
#[derive(PartialEq)]
pub struct PyVmExit {
    /// "inout", "mmio", "hlt", "pause_requested", "budget" or "fault".
    #[pyo3(get)]
    kind: &'static str,
    /// Address of the instruction that exited (for hlt: the address after it).
    #[pyo3(get)]
    rip: Option<u64>,
    #[pyo3(get)]
    port: Option<u16>,
    /// Access size in bytes (inout, mmio).
    #[pyo3(get)]
    size: Option<u8>,
    #[pyo3(get)]
    is_in: Option<bool>,
    #[pyo3(get)]
    gpa: Option<u64>,
    #[pyo3(get)]
    is_write: Option<bool>,
    /// The value written (out, mmio write); None for reads.
    #[pyo3(get)]
    value: Option<u64>,
    /// The fault kind's name ("divide_error", "invalid_opcode", ...).
    #[pyo3(get)]
    fault: Option<&'static str>,
    description: String,
}

impl PyVmExit {
    /// An exit of `kind` with no fields set yet.
    fn bare(kind: &'static str, description: String) -> PyVmExit {
        PyVmExit { kind, rip: None, port: None, size: None, is_in: None, gpa: None, is_write: None, value: None, fault: None, description }
    }

    fn inout(mut self, port: u16, size: u8, is_in: bool, value: u64, rip: u64) -> PyVmExit {
        (self.port, self.size, self.is_in, self.rip) = (Some(port), Some(size), Some(is_in), Some(rip));
        self.value = if is_in { None } else { Some(value) };
        self
    }

    fn mmio(mut self, gpa: u64, size: u8, is_write: bool, value: u64, rip: u64) -> PyVmExit {
        (self.gpa, self.size, self.is_write, self.rip) = (Some(gpa), Some(size), Some(is_write), Some(rip));
        self.value = if is_write { Some(value) } else { None };
        self
    }

    fn at(mut self, rip: u64, fault: Option<&'static str>) -> PyVmExit {
        (self.rip, self.fault) = (Some(rip), fault);
        self
    }

    /// An exit of the KVM vCPU, in the same shape as the simulated vCPU's.
    pub(super) fn from_kvm(exit: crate::kvm::KvmExit) -> PyVmExit {
        use crate::kvm::KvmExit;
        let description = match &exit {
            KvmExit::Fault { kind, detail, rip } => format!("{kind} at rip {rip:#x} {detail}"),
            other => format!("{other:?}"),
        };
        match exit {
            KvmExit::Inout { port, size, is_in, value, rip } => {
                Self::bare("inout", description).inout(port, size, is_in, value as u64, rip)
            }
            KvmExit::Mmio { gpa, size, is_write, value, rip } => Self::bare("mmio", description).mmio(gpa, size, is_write, value, rip),
            KvmExit::Hlt { rip } => Self::bare("hlt", description).at(rip, None),
            KvmExit::Fault { kind, rip, .. } => Self::bare("fault", description).at(rip, Some(kind)),
            KvmExit::PauseRequested => Self::bare("pause_requested", description),
        }
    }
}

impl From<Exit> for PyVmExit {
    fn from(exit: Exit) -> PyVmExit {
        let e = PyVmExit::bare(exit.kind_name(), exit.to_string());
        match exit {
            Exit::Inout { port, size, is_in, value, rip } => e.inout(port, size, is_in, value as u64, rip),
            Exit::Mmio { gpa, size, is_write, value, rip } => e.mmio(gpa, size, is_write, value, rip),
            Exit::Hlt { rip } => e.at(rip, None),
            Exit::Fault { kind, rip } => e.at(rip, Some(kind.name())),
            Exit::PauseRequested | Exit::Budget => e,
        }
    }
}

#[pymethods]
impl PyVmExit {
    fn __repr__(&self) -> String {
        format!("<VmExit {}: {}>", self.kind, self.description)
    }
}

#[pyclass(frozen, name = "Vcpu", module = "vmmpy._core")]
pub struct PyVcpu {
    id: u32,
    vendor: Vendor,
    tsc_mode: TscMode,
    handle: VcpuHandle,
    cpu: Mutex<Vcpu>,
}

impl PyVcpu {
    /// The register file, or EBUSY if `run` holds it.
    fn lock(&self) -> PyResult<MutexGuard<'_, Vcpu>> {
        match self.cpu.try_lock() {
            Ok(guard) => Ok(guard),
            Err(TryLockError::WouldBlock) => Err(PyOSError::new_err((libc::EBUSY, format!("vcpu {} is running", self.id)))),
            // A panic inside run poisons the lock; the register file itself is still consistent
            // (every instruction commits its effects only when it cannot fail).
            Err(TryLockError::Poisoned(poisoned)) => Ok(poisoned.into_inner()),
        }
    }
}

fn u64_of(obj: &Bound<'_, PyAny>, what: &str, vcpu: u32) -> PyResult<u64> {
    obj.extract::<u64>().map_err(|_| {
        let shown = obj.repr().map(|r| r.to_string()).unwrap_or_else(|_| "?".into());
        PyValueError::new_err(format!("vcpu {vcpu}: '{what}' must be an integer in 0..2**64, got {shown}"))
    })
}

fn item<'py>(dict: &Bound<'py, PyDict>, key: &str, path: &str, vcpu: u32) -> PyResult<Bound<'py, PyAny>> {
    dict.get_item(key)?.ok_or_else(|| PyValueError::new_err(format!("vcpu {vcpu}: saved state has no '{path}{key}'")))
}

fn str_of(obj: &Bound<'_, PyAny>, what: &str, vcpu: u32) -> PyResult<String> {
    obj.extract::<String>().map_err(|_| PyValueError::new_err(format!("vcpu {vcpu}: '{what}' must be a string")))
}

fn dict_of<'py>(obj: Bound<'py, PyAny>, what: &str, vcpu: u32) -> PyResult<Bound<'py, PyDict>> {
    obj.cast_into::<PyDict>().map_err(|_| PyValueError::new_err(format!("vcpu {vcpu}: '{what}' must be a dict")))
}

#[pymethods]
impl PyVcpu {
    #[new]
    #[pyo3(signature = (memory, vcpu_id = 0, vendor = "intel", tsc = "instructions"))]
    fn new(memory: PyRef<'_, PyGuestMemory>, vcpu_id: u32, vendor: &str, tsc: &str) -> PyResult<PyVcpu> {
        let vendor_kind = Vendor::parse(vendor)
            .ok_or_else(|| PyValueError::new_err(format!("vcpu {vcpu_id}: vendor '{vendor}' is not 'intel' or 'amd'")))?;
        let tsc_mode = TscMode::parse(tsc)
            .ok_or_else(|| PyValueError::new_err(format!("vcpu {vcpu_id}: tsc '{tsc}' is not 'instructions' or 'host'")))?;
        let cpu = Vcpu::new(memory.inner.clone(), vcpu_id, vendor_kind, tsc_mode);
        Ok(PyVcpu { id: vcpu_id, vendor: vendor_kind, tsc_mode, handle: cpu.handle(), cpu: Mutex::new(cpu) })
    }

    /// Execute at most `budget` instructions, with the GIL released, and return the exit.
    fn run(&self, py: Python<'_>, budget: u64) -> PyResult<PyVmExit> {
        let mut guard = self.lock()?;
        let cpu: &mut Vcpu = &mut guard;
        let exit = py.detach(|| cpu.run(budget)).map_err(cpu_error)?;
        Ok(exit.into())
    }

    /// Supply the value of the `in` or MMIO load the last exit stopped at; it retires.
    fn complete_read(&self, value: u64) -> PyResult<()> {
        self.lock()?.complete_read(value).map_err(cpu_error)
    }

    fn get_register(&self, name: &str) -> PyResult<u64> {
        self.lock()?.get_register(name).map_err(cpu_error)
    }

    fn set_register(&self, name: &str, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let value = u64_of(value, name, self.id)?;
        self.lock()?.set_register(name, value).map_err(cpu_error)
    }

    /// Every register by amd64 name.
    fn registers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let regs = self.lock()?.registers();
        let dict = PyDict::new(py);
        for (name, value) in regs {
            dict.set_item(name, value)?;
        }
        Ok(dict)
    }

    /// Make a running `run` return a "pause_requested" exit within a few hundred instructions
    /// (or the next `run` return it at once). Any thread, any time.
    fn request_pause(&self) {
        self.handle.request_pause()
    }

    /// Mark interrupt `vector` (0..255) pending. Any thread, any time.
    fn inject_interrupt(&self, vector: i64) -> PyResult<()> {
        let vector = u8::try_from(vector)
            .map_err(|_| PyValueError::new_err(format!("vcpu {}: interrupt vector {vector} is not in 0..255", self.id)))?;
        self.handle.inject_interrupt(vector);
        Ok(())
    }

    /// Pending vectors, ascending (a list of ints; Vec<u8> would become bytes).
    #[getter]
    fn pending_interrupts(&self) -> Vec<u32> {
        self.handle.pending_interrupts().into_iter().map(u32::from).collect()
    }

    #[getter]
    fn vcpu_id(&self) -> u32 {
        self.id
    }
    #[getter]
    fn vendor(&self) -> &'static str {
        self.vendor.name()
    }
    #[getter]
    fn tsc_mode(&self) -> &'static str {
        self.tsc_mode.name()
    }
    #[getter]
    fn instructions_retired(&self) -> PyResult<u64> {
        Ok(self.lock()?.instructions_retired())
    }
    #[getter]
    fn halted(&self) -> PyResult<bool> {
        Ok(self.lock()?.halted())
    }
    /// The guest TSC now.
    #[getter]
    fn tsc(&self) -> PyResult<u64> {
        Ok(self.lock()?.tsc())
    }
    /// Guest TSC = source + tsc_offset modulo 2**64.
    #[getter]
    fn get_tsc_offset(&self) -> PyResult<u64> {
        Ok(self.lock()?.tsc_offset())
    }
    #[setter]
    fn set_tsc_offset(&self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let value = u64_of(value, "tsc_offset", self.id)?;
        self.lock()?.set_tsc_offset(value);
        Ok(())
    }

    /// The read waiting for `complete_read` (a `PendingRead`), or None.
    #[getter]
    fn pending_read(&self) -> PyResult<Option<PyPendingRead>> {
        Ok(self.lock()?.pending_read().map(|r| PyPendingRead::from(&r)))
    }

    /// The whole vCPU state as a dict in this vendor's layout (docs/isa.md, "Saved state").
    fn save_state<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let state = self.lock()?.save_state();
        let dict = PyDict::new(py);
        dict.set_item("format", STATE_FORMAT)?;
        dict.set_item("vcpu_id", state.vcpu_id)?;
        dict.set_item("vendor", state.registers.vendor().name())?;
        dict.set_item("tsc_mode", state.tsc_mode.name())?;
        for (group, fields) in state.registers.groups() {
            let g = PyDict::new(py);
            for (name, value) in fields {
                g.set_item(name, value)?;
            }
            dict.set_item(group, g)?;
        }
        let vectors: Vec<u32> = vectors_of(&state.pending_interrupts).into_iter().map(u32::from).collect();
        dict.set_item("pending_interrupts", PyList::new(py, vectors)?)?;
        dict.set_item("halted", state.halted)?;
        match state.pending_read {
            Some(read) => dict.set_item("pending_read", pending_read_dict(py, &read)?)?,
            None => dict.set_item("pending_read", py.None())?,
        }
        dict.set_item("instructions_retired", state.instructions_retired)?;
        dict.set_item("guest_tsc", state.guest_tsc)?;
        Ok(dict)
    }

    /// Load a dict from `save_state`. Checked whole before anything changes; refuses another
    /// vendor, TSC mode, vCPU id or format, missing and unknown fields, naming them.
    fn restore_state(&self, state: &Bound<'_, PyDict>) -> PyResult<()> {
        let id = self.id;
        let bad = |msg: String| PyValueError::new_err(format!("vcpu {id}: {msg}"));
        let format = u64_of(&item(state, "format", "", id)?, "format", id)?;
        if format != STATE_FORMAT {
            return Err(bad(format!("saved state format {format} is not the one this vmmpy reads ({STATE_FORMAT})")));
        }
        let vendor_name = str_of(&item(state, "vendor", "", id)?, "vendor", id)?;
        let vendor =
            Vendor::parse(&vendor_name).ok_or_else(|| bad(format!("saved state vendor '{vendor_name}' is not 'intel' or 'amd'")))?;
        if vendor != self.vendor {
            return Err(cpu_error(CpuError::VendorMismatch { vcpu: id, ours: self.vendor, theirs: vendor }));
        }
        let tsc_name = str_of(&item(state, "tsc_mode", "", id)?, "tsc_mode", id)?;
        let tsc_mode =
            TscMode::parse(&tsc_name).ok_or_else(|| bad(format!("saved state tsc_mode '{tsc_name}' is not 'instructions' or 'host'")))?;
        let vcpu_id = u64_of(&item(state, "vcpu_id", "", id)?, "vcpu_id", id)?;
        let vcpu_id = u32::try_from(vcpu_id).map_err(|_| bad(format!("saved state vcpu_id {vcpu_id} is out of range")))?;

        let mut known: Vec<&str> = vec![
            "format",
            "vcpu_id",
            "vendor",
            "tsc_mode",
            "pending_interrupts",
            "halted",
            "pending_read",
            "instructions_retired",
            "guest_tsc",
        ];
        let group_names = VendorState::group_names(vendor);
        known.extend_from_slice(group_names);
        for key in state.keys() {
            let key = str_of(&key, "a saved state key", id)?;
            if !known.contains(&key.as_str()) {
                return Err(bad(format!("saved state has a field '{key}' this {vendor} vcpu does not understand")));
            }
        }
        let mut groups = Vec::new();
        for &group in group_names {
            groups.push((group, dict_of(item(state, group, "", id)?, group, id)?));
        }
        let registers = VendorState::from_groups(vendor, |group, field| {
            let dict = &groups.iter().find(|(g, _)| *g == group).expect("every group was read").1;
            u64_of(&item(dict, field, &format!("{group}."), id)?, &format!("{group}.{field}"), id)
        })?;
        // Unknown fields inside a group would be silently lost: refuse them too.
        let expected: Vec<(&str, Vec<&str>)> =
            registers.groups().into_iter().map(|(g, fields)| (g, fields.into_iter().map(|(f, _)| f).collect())).collect();
        for ((group, dict), (_, fields)) in groups.iter().zip(&expected) {
            for key in dict.keys() {
                let key = str_of(&key, &format!("a key of '{group}'"), id)?;
                if !fields.contains(&key.as_str()) {
                    return Err(bad(format!("saved state field '{group}.{key}' is not part of the {vendor} layout")));
                }
            }
        }

        let mut pending_interrupts = [0u64; 4];
        let vectors = item(state, "pending_interrupts", "", id)?;
        for v in vectors.try_iter().map_err(|_| bad("'pending_interrupts' must be a list of vectors".into()))? {
            let v = u64_of(&v?, "pending_interrupts[]", id)?;
            if v > 255 {
                return Err(bad(format!("pending interrupt vector {v} is not in 0..255")));
            }
            pending_interrupts[v as usize / 64] |= 1 << (v % 64);
        }
        let halted = item(state, "halted", "", id)?.extract::<bool>().map_err(|_| bad("'halted' must be a bool".into()))?;
        let read_obj = item(state, "pending_read", "", id)?;
        let pending_read = if read_obj.is_none() { None } else { Some(pending_read_from(dict_of(read_obj, "pending_read", id)?, id)?) };
        let instructions_retired = u64_of(&item(state, "instructions_retired", "", id)?, "instructions_retired", id)?;
        let guest_tsc = u64_of(&item(state, "guest_tsc", "", id)?, "guest_tsc", id)?;

        let state = VcpuState { vcpu_id, tsc_mode, registers, pending_interrupts, halted, pending_read, instructions_retired, guest_tsc };
        self.lock()?.restore_state(&state).map_err(cpu_error)
    }

    fn __repr__(&self) -> String {
        format!("<Vcpu {} {} tsc={}>", self.id, self.vendor, self.tsc_mode.name())
    }
}

result_class! {
    /// The `in` or MMIO load a vCPU stopped at, waiting for `complete_read`: `source` is "port"
    /// (then `port` is set) or "mmio" (then `gpa`), `size` in bytes, and the register it loads.
    PyPendingRead as "PendingRead" {
        source: &'static str,
        port: Option<u16>,
        gpa: Option<u64>,
        size: u8,
        register: &'static str,
    }
}

impl From<&PendingRead> for PyPendingRead {
    fn from(read: &PendingRead) -> PyPendingRead {
        let (source, port, gpa) = match read.source {
            ReadSource::Port(port) => ("port", Some(port), None),
            ReadSource::Mmio(gpa) => ("mmio", None, Some(gpa)),
        };
        PyPendingRead { source, port, gpa, size: read.size, register: GPR_NAMES[read.dst as usize] }
    }
}

/// The pending read as the saved state writes it (docs/isa.md, "Saved state").
fn pending_read_dict<'py>(py: Python<'py>, read: &PendingRead) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    match read.source {
        ReadSource::Port(port) => {
            dict.set_item("source", "port")?;
            dict.set_item("port", port)?;
        }
        ReadSource::Mmio(gpa) => {
            dict.set_item("source", "mmio")?;
            dict.set_item("gpa", gpa)?;
        }
    }
    dict.set_item("size", read.size)?;
    dict.set_item("register", GPR_NAMES[read.dst as usize])?;
    Ok(dict)
}

fn pending_read_from(dict: Bound<'_, PyDict>, id: u32) -> PyResult<PendingRead> {
    let bad = |msg: String| PyValueError::new_err(format!("vcpu {id}: {msg}"));
    let source_name = str_of(&item(&dict, "source", "pending_read.", id)?, "pending_read.source", id)?;
    let source = match source_name.as_str() {
        "port" => {
            let port = u64_of(&item(&dict, "port", "pending_read.", id)?, "pending_read.port", id)?;
            ReadSource::Port(u16::try_from(port).map_err(|_| bad(format!("pending_read.port {port:#x} is not a 16-bit port")))?)
        }
        "mmio" => ReadSource::Mmio(u64_of(&item(&dict, "gpa", "pending_read.", id)?, "pending_read.gpa", id)?),
        other => return Err(bad(format!("pending_read.source '{other}' is not 'port' or 'mmio'"))),
    };
    let size = u64_of(&item(&dict, "size", "pending_read.", id)?, "pending_read.size", id)?;
    let size = u8::try_from(size).map_err(|_| bad(format!("pending_read.size {size} is not 1, 2, 4 or 8")))?;
    let register = str_of(&item(&dict, "register", "pending_read.", id)?, "pending_read.register", id)?;
    let dst = isa::gpr_number(&register).ok_or_else(|| bad(format!("pending_read.register '{register}' is not a general register")))?;
    Ok(PendingRead { source, size, dst: dst as u8 })
}

/// The ISA's opcode table (mnemonic -> opcode), so the Python assembler can check its own.
#[pyfunction]
fn isa_opcodes<'py>(py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    for &(opcode, name) in isa::MNEMONICS {
        dict.set_item(name, opcode)?;
    }
    Ok(dict)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyVcpu>()?;
    m.add_class::<PyVmExit>()?;
    m.add_class::<PyPendingRead>()?;
    m.add_function(wrap_pyfunction!(isa_opcodes, m)?)?;
    m.add("VCPU_REGISTER_NAMES", crate::cpu::REGISTER_NAMES.to_vec())?;
    m.add("VCPU_POLL_INTERVAL", crate::cpu::POLL_INTERVAL)?;
    Ok(())
}
