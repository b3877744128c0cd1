//! Bindings for TLS ended in the core: `TlsIdentity` (PEM in, configs out), `TlsStream` (a
//! connected socket's session: handshake, send, receive, close_notify), and `Endpoint`, what the
//! page functions accept where they write or read: an fd, or a `TlsStream`.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

use pyo3::create_exception;
use pyo3::exceptions::{PyBlockingIOError, PyConnectionError, PyOSError, PyTimeoutError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::pages::page_error;
use crate::wire::{HandshakeFailure, Link, RecvError, Side, TlsIdentity, TlsStream, Wait};

create_exception!(
    _core,
    TlsHandshakeError,
    PyOSError,
    "A TLS handshake failed: `kind` says how (timeout, closed, io, untrusted, refused, version, not-tls, other), `detail` what, `received` the peer's first bytes."
);

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("TlsHandshakeError", m.py().get_type::<TlsHandshakeError>())?;
    m.add_class::<PyTlsIdentity>()?;
    m.add_class::<PyTlsStream>()?;
    Ok(())
}

/// Where page batches go: an fd (int), or a `TlsStream`.
#[derive(FromPyObject)]
pub enum Endpoint {
    Fd(RawFd),
    Tls(Py<PyTlsStream>),
}

/// An [`Endpoint`] that may leave the GIL behind.
pub enum OwnedEndpoint {
    Fd(RawFd),
    Tls(Arc<TlsStream>),
}

impl Endpoint {
    pub fn owned(&self) -> OwnedEndpoint {
        match self {
            Endpoint::Fd(fd) => OwnedEndpoint::Fd(*fd),
            Endpoint::Tls(t) => OwnedEndpoint::Tls(t.get().inner.clone()),
        }
    }
}

impl OwnedEndpoint {
    pub fn link(&self) -> Link<'_> {
        match self {
            OwnedEndpoint::Fd(fd) => Link::Fd(*fd),
            OwnedEndpoint::Tls(t) => Link::Tls(t),
        }
    }
}

/// A side's certificates, from PEM text: `cert` and `key` (None for a client that shows no
/// certificate) and `ca`. A part that cannot be used is a ValueError starting with its name
/// ("certificate: ...", "key: ...", "ca: ...").
#[pyclass(name = "TlsIdentity", module = "vmmpy._core", frozen)]
pub struct PyTlsIdentity {
    inner: TlsIdentity,
}

#[pymethods]
impl PyTlsIdentity {
    #[new]
    #[pyo3(signature = (cert, key, ca))]
    fn new(cert: Option<&[u8]>, key: Option<&[u8]>, ca: &[u8]) -> PyResult<PyTlsIdentity> {
        let inner = TlsIdentity::from_pem(cert, key, ca).map_err(|e| PyValueError::new_err(e.to_string()))?;
        // Build both configs now, so what rustls refuses is said before any connection.
        if inner.client_config().is_err() || cert.is_some() {
            inner.client_config().map_err(|e| PyValueError::new_err(e.to_string()))?;
        }
        if cert.is_some() {
            inner.server_config().map_err(|e| PyValueError::new_err(e.to_string()))?;
        }
        Ok(PyTlsIdentity { inner })
    }
}

/// A connected socket's TLS 1.3 session, ended in the core. The socket (`fd`) stays the
/// caller's: it keeps it open while this is used, sets its timeouts, and may shut it down to wake
/// a blocked call.
#[pyclass(name = "TlsStream", module = "vmmpy._core", frozen)]
pub struct PyTlsStream {
    pub inner: Arc<TlsStream>,
}

fn handshake_error(f: HandshakeFailure) -> PyErr {
    Python::attach(|py| {
        let made = py.get_type::<TlsHandshakeError>().call1((f.detail(),)).and_then(|exc| {
            exc.setattr("kind", f.kind())?;
            exc.setattr("detail", f.detail())?;
            exc.setattr("received", PyBytes::new(py, f.received()))?;
            Ok(PyErr::from_value(exc))
        });
        made.unwrap_or_else(|e| e)
    })
}

fn recv_error(e: RecvError) -> PyErr {
    match e {
        RecvError::TimedOut(t) => PyTimeoutError::new_err(format!("nothing arrived for {:.3} s", t.as_secs_f64())),
        RecvError::Tls(why) => PyConnectionError::new_err((libc::EPROTO, why)),
        RecvError::Io(e) if e.kind() == std::io::ErrorKind::WouldBlock => PyBlockingIOError::new_err((libc::EAGAIN, e.to_string())),
        RecvError::Io(e) => PyErr::from(e),
    }
}

#[pymethods]
impl PyTlsStream {
    /// Run the handshake on the connected blocking socket `fd` within `timeout` seconds: as the
    /// server, or as a client checking the server against `server_name` and waiting until the
    /// server has accepted this side's certificate. Raises TlsHandshakeError.
    #[staticmethod]
    #[pyo3(signature = (fd, identity, *, server_side, server_name = None, timeout))]
    fn handshake(
        py: Python<'_>,
        fd: RawFd,
        identity: PyRef<'_, PyTlsIdentity>,
        server_side: bool,
        server_name: Option<String>,
        timeout: f64,
    ) -> PyResult<PyTlsStream> {
        let side = if server_side {
            Side::Server { config: identity.inner.server_config().map_err(|e| PyValueError::new_err(e.to_string()))? }
        } else {
            let server_name = server_name.ok_or_else(|| PyValueError::new_err("a client must name the server it expects"))?;
            Side::Client { config: identity.inner.client_config().map_err(|e| PyValueError::new_err(e.to_string()))?, server_name }
        };
        let timeout = Duration::try_from_secs_f64(timeout).map_err(|_| PyValueError::new_err(format!("bad timeout {timeout}")))?;
        let stream = py.detach(move || TlsStream::handshake(fd, side, timeout)).map_err(handshake_error)?;
        Ok(PyTlsStream { inner: Arc::new(stream) })
    }

    /// Encrypt and send all of `data` (within the socket's send timeout, counted from the last
    /// byte the peer took).
    fn sendall(&self, py: Python<'_>, data: &[u8]) -> PyResult<()> {
        let inner = self.inner.clone();
        py.detach(move || inner.send_parts(&[data], "sending")).map_err(page_error)
    }

    /// Receive into `buffer` (a writable bytes-like object) at most `nbytes` (0: its size);
    /// returns the count, 0 at the end of the stream. `block=False` raises BlockingIOError when
    /// nothing is ready; `peek` leaves the bytes to be read again. The bytes of the buffer after
    /// the count, up to `nbytes`, may be overwritten (a record is opened where it fits).
    #[pyo3(signature = (buffer, nbytes = 0, *, block = true, peek = false))]
    fn recv_into(&self, py: Python<'_>, buffer: pyo3::buffer::PyBuffer<u8>, nbytes: usize, block: bool, peek: bool) -> PyResult<usize> {
        if buffer.readonly() {
            return Err(PyValueError::new_err("the buffer is read-only"));
        }
        let len = if nbytes == 0 { buffer.len_bytes() } else { nbytes.min(buffer.len_bytes()) };
        let ptr = buffer.buf_ptr() as usize;
        let inner = self.inner.clone();
        let wait = if block { Wait::Timeout } else { Wait::Never };
        py.detach(move || {
            // SAFETY: the PyBuffer keeps the exporter's memory alive and writable for the call;
            // `len` is within it.
            let dst = unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, len) };
            inner.recv(dst, wait, peek)
        })
        .map_err(recv_error)
    }

    /// Plaintext that arrived and is not read yet (a receive would not wait for it).
    fn pending(&self) -> usize {
        self.inner.pending()
    }

    /// Send close_notify (best effort, within the socket's send timeout).
    fn close_notify(&self, py: Python<'_>) {
        let inner = self.inner.clone();
        py.detach(move || inner.close_notify());
    }

    /// Stop touching the fd (its owner closes it next).
    fn detach(&self) {
        self.inner.detach();
    }

    /// "encrypted with TLSv1.3 (cipher suite)".
    #[getter]
    fn summary(&self) -> String {
        self.inner.summary().to_string()
    }

    /// The names the peer's certificate was checked for (client) or carries (server).
    #[getter]
    fn peer_names(&self) -> String {
        self.inner.peer_names().to_string()
    }

    /// Why the stream stopped early, or None.
    #[getter]
    fn failure(&self) -> Option<String> {
        self.inner.failure()
    }

    #[getter]
    fn fd(&self) -> RawFd {
        self.inner.fd()
    }
}
