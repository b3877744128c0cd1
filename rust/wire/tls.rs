//! Mutual TLS 1.3 ended in the core (rustls): a connected socket and its TLS session as one
//! object, [`TlsStream`], which the frames above and the page batches here both read and write.
//!
//! Page batches go through it as they go through a plain fd (`fdio::Link`): their bytes are
//! encrypted straight from guest memory into TLS records and written with one sendmsg per run of
//! records, and received records are decrypted and copied straight into guest memory. There is no
//! relay thread and no socketpair: the only extra pass over the bytes is the cipher's.
//!
//! The socket stays the caller's: it owns the fd, sets its SO_SNDTIMEO / SO_RCVTIMEO (honoured as
//! `stall` explains: a send's timeout counts from the last byte the peer took, a receive's from
//! the last byte that arrived) and may shut it down from another thread to wake whatever is
//! blocked here. One thread may send while another receives: a send lock orders whole writes, a
//! receive lock whole reads, and the session itself is locked only while bytes are en- or
//! decrypted, never across a wait.
//!
//! The handshake ([`TlsStream::handshake`]) is bounded by a deadline. A client's handshake ends
//! only once the server has accepted its certificate: TLS 1.3 lets the client finish before the
//! server has checked it, so the client waits for the server's first record after the handshake (a
//! session ticket, sent once the certificate passed) or its alert. What failed is reported as
//! fact ([`HandshakeFailure`]); the words a user reads are the caller's.
//!
//! Owns nothing of what travels, which certificates are wanted, or where they come from: the
//! caller gives PEM text ([`TlsIdentity`]) and the name the server must carry.

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustls::client::{ClientSessionStore, Resumption};
use rustls::crypto::{ring, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    AlertDescription, CertificateError, ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig, ServerConnection,
};

use super::stall::{poll_ms, socket_timeout, timed_out, SendDeadline};
use crate::digest::{Direction, PageError};

/// Ciphertext read from the socket at a time (at most): one syscall brings many records.
const INBOX_BYTES: usize = 256 << 10;
/// Plaintext handed to the session at a time when sending: its records are then written to the
/// socket before more is encrypted, so at most this much ciphertext waits in memory.
const SEND_STEP: usize = 256 << 10;
/// The first bytes a handshake received, kept to recognise a peer that answered in plaintext.
const KEEP_RECEIVED: usize = 4096;

/// A side's certificates: the chain it presents with its key (a client may present none), and the
/// CA certificates the peer's chain must lead to.
pub struct TlsIdentity {
    chain: Vec<CertificateDer<'static>>,
    key: Option<PrivateKeyDer<'static>>,
    roots: Arc<RootCertStore>,
}

/// Which of the PEM inputs could not be used, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityError {
    /// "certificate", "key" or "ca".
    pub part: &'static str,
    pub why: String,
}

impl fmt::Display for IdentityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.part, self.why)
    }
}

fn provider() -> Arc<CryptoProvider> {
    // AES-128-GCM first: with AES-NI it is the fastest of the three, and page data is bulk.
    let mut p = ring::default_provider();
    p.cipher_suites = vec![
        ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
        ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

impl TlsIdentity {
    /// From PEM text: `cert` (the chain, leaf first) and `key`, both None for a client that shows
    /// no certificate; `ca`, one or more CA certificates.
    pub fn from_pem(cert: Option<&[u8]>, key: Option<&[u8]>, ca: &[u8]) -> Result<TlsIdentity, IdentityError> {
        let err = |part, why: String| IdentityError { part, why };
        let chain = match cert {
            Some(pem) => {
                let chain = CertificateDer::pem_slice_iter(pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| err("certificate", format!("cannot parse its PEM: {e}")))?;
                if chain.is_empty() {
                    return Err(err("certificate", "no PEM certificate in it".into()));
                }
                chain
            }
            None => Vec::new(),
        };
        let key = match key {
            Some(pem) => {
                Some(PrivateKeyDer::from_pem_slice(pem).map_err(|e| err("key", format!("cannot parse its PEM private key: {e}")))?)
            }
            None => None,
        };
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca) {
            let c = c.map_err(|e| err("ca", format!("cannot parse its PEM: {e}")))?;
            roots.add(c).map_err(|e| err("ca", format!("not a usable CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(err("ca", "no PEM certificate in it".into()));
        }
        Ok(TlsIdentity { chain, key, roots: Arc::new(roots) })
    }

    /// A TLS 1.3-only client that checks the server against the CA and presents the chain.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, IdentityError> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| IdentityError { part: "certificate", why: e.to_string() })?
            .with_root_certificates(self.roots.clone());
        let config = match &self.key {
            Some(key) => builder
                .with_client_auth_cert(self.chain.clone(), key.clone_key())
                .map_err(|e| IdentityError { part: "key", why: e.to_string() })?,
            None => builder.with_no_client_auth(),
        };
        Ok(Arc::new(config))
    }

    /// A TLS 1.3-only server that presents the chain and requires a client certificate signed by
    /// the CA (mutual TLS). It sends one session ticket once the client's certificate passed.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, IdentityError> {
        let p = provider();
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), p.clone())
            .build()
            .map_err(|e| IdentityError { part: "ca", why: e.to_string() })?;
        let key = self.key.as_ref().ok_or(IdentityError { part: "key", why: "a server must present a certificate".into() })?;
        let mut config = ServerConfig::builder_with_provider(p)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| IdentityError { part: "certificate", why: e.to_string() })?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), key.clone_key())
            .map_err(|e| IdentityError { part: "key", why: e.to_string() })?;
        config.send_tls13_tickets = 1;
        Ok(Arc::new(config))
    }
}

/// How a handshake failed, as fact.
#[derive(Debug)]
pub enum HandshakeFailure {
    /// The deadline passed.
    TimedOut,
    /// The peer closed the connection; `received` holds its first bytes.
    Closed { received: Vec<u8> },
    /// The socket failed.
    Io(io::Error),
    /// TLS failed: our check of the peer, the peer's alert, or a peer that does not speak TLS 1.3.
    Tls { error: rustls::Error, received: Vec<u8> },
}

impl HandshakeFailure {
    /// The kind of failure: "timeout", "closed", "io", "untrusted" (the peer's certificate did
    /// not pass here), "refused" (the peer refused ours), "version" (not TLS 1.3), "not-tls"
    /// (what arrived is not TLS), "other".
    pub fn kind(&self) -> &'static str {
        use rustls::Error as E;
        match self {
            HandshakeFailure::TimedOut => "timeout",
            HandshakeFailure::Closed { .. } => "closed",
            HandshakeFailure::Io(_) => "io",
            HandshakeFailure::Tls { error, .. } => match error {
                E::InvalidCertificate(_) | E::NoCertificatesPresented => "untrusted",
                E::AlertReceived(a) => match a {
                    AlertDescription::ProtocolVersion => "version",
                    AlertDescription::UnknownCA
                    | AlertDescription::BadCertificate
                    | AlertDescription::CertificateUnknown
                    | AlertDescription::CertificateRequired
                    | AlertDescription::CertificateExpired
                    | AlertDescription::CertificateRevoked
                    | AlertDescription::UnsupportedCertificate
                    | AlertDescription::DecryptError
                    | AlertDescription::AccessDenied => "refused",
                    _ => "other",
                },
                E::PeerIncompatible(_) => "version",
                E::InvalidMessage(_)
                | E::InappropriateMessage { .. }
                | E::InappropriateHandshakeMessage { .. }
                | E::PeerSentOversizedRecord => "not-tls",
                _ => "other",
            },
        }
    }

    /// What was wrong, in a few words.
    pub fn detail(&self) -> String {
        match self {
            HandshakeFailure::TimedOut => "the deadline passed".into(),
            HandshakeFailure::Closed { .. } => "the peer closed the connection".into(),
            HandshakeFailure::Io(e) => e.to_string(),
            HandshakeFailure::Tls { error, .. } => describe(error),
        }
    }

    /// The first bytes the peer sent, for recognising a plaintext answer.
    pub fn received(&self) -> &[u8] {
        match self {
            HandshakeFailure::Closed { received } | HandshakeFailure::Tls { received, .. } => received,
            _ => &[],
        }
    }
}

/// `CertificateRequired` -> "certificate required".
fn spaced(name: &str) -> String {
    let mut out = String::new();
    let mut prev_lower = false;
    for c in name.chars() {
        if c.is_uppercase() && prev_lower {
            out.push(' ');
        }
        prev_lower = c.is_lowercase() || c.is_ascii_digit();
        out.extend(c.to_lowercase());
    }
    out
}

fn describe(error: &rustls::Error) -> String {
    use rustls::Error as E;
    match error {
        E::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => "unknown issuer: not signed by a trusted CA".into(),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "certificate has expired".into(),
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => "certificate is not yet valid".into(),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "hostname mismatch: the certificate does not name the host".into()
            }
            CertificateError::BadSignature => "bad signature".into(),
            other => format!("invalid certificate: {}", spaced(&format!("{other:?}")).split(['(', '{']).next().unwrap_or("").trim()),
        },
        E::NoCertificatesPresented => "the peer did not return a certificate".into(),
        E::AlertReceived(a) => format!("alert {}", spaced(&format!("{a:?}"))),
        E::DecryptError => "bad record mac".into(),
        other => other.to_string(),
    }
}

/// The reason a stream stopped, as the user reads it (a record that failed its check says so).
fn stream_failure(error: &rustls::Error) -> String {
    match error {
        rustls::Error::DecryptError => "TLS: bad record mac: the stream was altered on the way".into(),
        other => format!("TLS: {}", describe(other)),
    }
}

/// A client session store that only notes that the server sent a ticket: the server sends it
/// once it has accepted the client's certificate (`server_config`), which is what the client
/// waits for. Nothing is ever resumed.
#[derive(Debug, Default)]
struct TicketSeen(AtomicBool);

impl ClientSessionStore for TicketSeen {
    fn set_kx_hint(&self, _: ServerName<'static>, _: rustls::NamedGroup) {}
    fn kx_hint(&self, _: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        None
    }
    fn set_tls12_session(&self, _: ServerName<'static>, _: rustls::client::Tls12ClientSessionValue) {}
    fn tls12_session(&self, _: &ServerName<'_>) -> Option<rustls::client::Tls12ClientSessionValue> {
        None
    }
    fn remove_tls12_session(&self, _: &ServerName<'static>) {}
    fn insert_tls13_ticket(&self, _: ServerName<'static>, _: rustls::client::Tls13ClientSessionValue) {
        self.0.store(true, Ordering::Release);
    }
    fn take_tls13_ticket(&self, _: &ServerName<'static>) -> Option<rustls::client::Tls13ClientSessionValue> {
        None
    }
}

/// Which end of the handshake this is.
pub enum Side {
    Client { config: Arc<ClientConfig>, server_name: String },
    Server { config: Arc<ServerConfig> },
}

/// Reads and writes on the caller's socket without sleeping in the kernel (MSG_DONTWAIT): the
/// waits happen in poll(), outside the session lock. Keeps the first bytes read when asked.
struct Socket<'a> {
    fd: RawFd,
    keep: Option<&'a mut Vec<u8>>,
}

impl Read for Socket<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: recv writes at most buf.len() bytes into buf, which we borrow mutably.
        let n = unsafe { libc::recv(self.fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        if let Some(keep) = self.keep.as_deref_mut() {
            let room = KEEP_RECEIVED.saturating_sub(keep.len());
            keep.extend_from_slice(&buf[..n.min(room)]);
        }
        Ok(n)
    }
}

impl Write for Socket<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        // SAFETY: an all-zero msghdr is valid (no name, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = bufs.as_ptr() as *mut libc::iovec; // IoSlice is ABI-compatible with iovec
        msg.msg_iovlen = bufs.len() as _;
        // SAFETY: the slices are readable for the call; the kernel only reads them.
        let n = unsafe { libc::sendmsg(self.fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Wait for `events` on `fd` for at most `wait` (None: without limit); false when it ran out.
fn wait_for(fd: RawFd, events: libc::c_short, wait: Option<Duration>) -> io::Result<bool> {
    let started = Instant::now();
    loop {
        let ms = wait.map_or(-1, |w| if w.is_zero() { 0 } else { poll_ms(w.saturating_sub(started.elapsed())) });
        let mut pfd = libc::pollfd { fd, events, revents: 0 };
        // SAFETY: one pollfd of ours.
        match unsafe { libc::poll(&mut pfd, 1, ms) } {
            0 => {
                if wait.is_none_or(|w| started.elapsed() >= w) {
                    return Ok(false);
                }
            }
            n if n < 0 => {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
            _ => return Ok(true),
        }
    }
}

/// Ciphertext read from the socket and not yet handed to the session, plaintext peeked at, and
/// whether the socket has reached its end.
struct Inbox {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
    peeked: Vec<u8>,
}

/// How a receive waits when nothing is ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Up to the socket's SO_RCVTIMEO (without limit when it has none).
    Timeout,
    /// Not at all (a non-blocking read): `io::ErrorKind::WouldBlock` when nothing is ready.
    Never,
}

/// A connected socket's TLS session; see the module doc.
pub struct TlsStream {
    fd: RawFd,
    conn: Mutex<Connection>,
    send_lock: Mutex<()>,
    inbox: Mutex<Inbox>,
    failure: Mutex<Option<String>>,
    detached: AtomicBool,
    summary: String,
    peer_names: String,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TlsStream(fd {}, {})", self.fd, self.summary)
    }
}

impl TlsStream {
    /// Run the handshake on the connected, blocking socket `fd` (the caller's; it stays open and
    /// the caller's) within `timeout`. Ciphertext that arrived with the handshake's last records
    /// is kept for the first receive.
    pub fn handshake(fd: RawFd, side: Side, timeout: Duration) -> Result<TlsStream, HandshakeFailure> {
        let deadline = Instant::now() + timeout;
        let mut received = Vec::new();
        let ticket = Arc::new(TicketSeen::default());
        let (mut conn, peer_name): (Connection, Option<String>) = match side {
            Side::Client { config, server_name } => {
                let name = ServerName::try_from(server_name.clone()).map_err(|e| HandshakeFailure::Tls {
                    error: rustls::Error::General(format!("{server_name:?} is not a host name or address: {e}")),
                    received: Vec::new(),
                })?;
                let mut config = (*config).clone();
                config.resumption = Resumption::store(ticket.clone());
                let conn =
                    ClientConnection::new(Arc::new(config), name).map_err(|error| HandshakeFailure::Tls { error, received: Vec::new() })?;
                (conn.into(), Some(server_name))
            }
            Side::Server { config } => {
                let conn = ServerConnection::new(config).map_err(|error| HandshakeFailure::Tls { error, received: Vec::new() })?;
                (conn.into(), None)
            }
        };
        let client = peer_name.is_some();
        let mut data_waiting = false;
        let left = || deadline.saturating_duration_since(Instant::now());
        loop {
            while conn.wants_write() {
                match conn.write_tls(&mut Socket { fd, keep: None }) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if !wait_for(fd, libc::POLLOUT, Some(left())).map_err(HandshakeFailure::Io)? {
                            return Err(HandshakeFailure::TimedOut);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(HandshakeFailure::Io(e)),
                }
            }
            if !conn.is_handshaking() {
                // A server is done; a client once its certificate was accepted (a ticket came) or
                // the server already sent data, which it does only after accepting it.
                if !client || ticket.0.load(Ordering::Acquire) || data_waiting {
                    break;
                }
            }
            if !wait_for(fd, libc::POLLIN, Some(left())).map_err(HandshakeFailure::Io)? {
                return Err(HandshakeFailure::TimedOut);
            }
            match conn.read_tls(&mut Socket { fd, keep: Some(&mut received) }) {
                Ok(0) => return Err(HandshakeFailure::Closed { received }),
                Ok(_) => {}
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => continue,
                Err(e) => return Err(HandshakeFailure::Io(e)),
            }
            match conn.process_new_packets() {
                Ok(state) => data_waiting = state.plaintext_bytes_to_read() > 0,
                Err(error) => {
                    // The alert tells the peer why (best effort: the connection is given up).
                    let _ = conn.write_tls(&mut Socket { fd, keep: None });
                    return Err(HandshakeFailure::Tls { error, received });
                }
            }
        }
        conn.set_buffer_limit(None); // a send encrypts all it is given; its records leave before the next
        let (summary, peer_names) = summarize(&conn, peer_name.as_deref());
        Ok(TlsStream {
            fd,
            conn: Mutex::new(conn),
            send_lock: Mutex::new(()),
            inbox: Mutex::new(Inbox { buf: vec![0; INBOX_BYTES], start: 0, end: 0, eof: false, peeked: Vec::new() }),
            failure: Mutex::new(None),
            detached: AtomicBool::new(false),
            summary,
            peer_names,
        })
    }

    pub fn fd(&self) -> RawFd {
        self.fd
    }

    /// Protocol and cipher suite, as "encrypted with TLSv1.3 (TLS13_AES_128_GCM_SHA256)".
    pub fn summary(&self) -> &str {
        &self.summary
    }

    /// The names the peer's certificate was checked for (a client: the server's name it
    /// connected to) or carries (a server: the client certificate's DNS names).
    pub fn peer_names(&self) -> &str {
        &self.peer_names
    }

    /// Why the stream stopped early (a record that failed its check, an alert, a peer that closed
    /// without ending TLS), or None.
    pub fn failure(&self) -> Option<String> {
        lock(&self.failure).clone()
    }

    fn fail(&self, why: String) -> String {
        let mut f = lock(&self.failure);
        f.get_or_insert(why).clone()
    }

    /// Plaintext received and not yet read (a read would not wait for it).
    pub fn pending(&self) -> usize {
        // A reader blocked in another thread holds the inbox: then nothing is waiting unread.
        let Ok(inbox) = self.inbox.try_lock() else { return 0 };
        let peeked = inbox.peeked.len();
        drop(inbox);
        peeked + lock(&self.conn).process_new_packets().map_or(0, |s| s.plaintext_bytes_to_read())
    }

    /// From now on the fd is not touched (the caller is about to close it).
    pub fn detach(&self) {
        self.detached.store(true, Ordering::Release);
    }

    fn check_attached(&self) -> io::Result<()> {
        if self.detached.load(Ordering::Acquire) {
            return Err(io::Error::from_raw_os_error(libc::EBADF));
        }
        Ok(())
    }

    // -- sending ---------------------------------------------------------------------------------

    /// Encrypt and write every byte of `parts`, in order, as one write no other send interleaves
    /// with. The socket's SO_SNDTIMEO counts from the last byte the peer took.
    pub fn send_parts(&self, parts: &[&[u8]], what: &str) -> Result<(), PageError> {
        let _order = lock(&self.send_lock);
        self.check_attached().map_err(|e| PageError::io(what.to_string(), e))?;
        let mut deadline = SendDeadline::new(self.fd);
        for part in parts {
            for piece in part.chunks(SEND_STEP) {
                {
                    let mut c = lock(&self.conn);
                    let mut w = c.writer();
                    w.write_all(piece).map_err(|e| PageError::io(format!("{what}: TLS"), e))?;
                }
                self.flush(&mut deadline, what)?;
            }
        }
        Ok(())
    }

    /// [`send_parts`](Self::send_parts) for iovecs.
    ///
    /// # Safety
    /// Every iovec must describe memory readable for the whole call.
    pub unsafe fn send_iovecs(&self, iovs: &[libc::iovec], what: &str) -> Result<(), PageError> {
        // SAFETY: the caller's contract: each iovec is readable memory for the call.
        let parts: Vec<&[u8]> = iovs
            .iter()
            .filter(|v| v.iov_len > 0)
            .map(|v| unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) })
            .collect();
        self.send_parts(&parts, what)
    }

    /// Write the session's queued records to the socket (the caller holds the send lock).
    fn flush(&self, deadline: &mut Option<SendDeadline>, what: &str) -> Result<(), PageError> {
        loop {
            let written = {
                let mut c = lock(&self.conn);
                if !c.wants_write() {
                    return Ok(());
                }
                c.write_tls(&mut Socket { fd: self.fd, keep: None })
            };
            match written {
                Ok(_) => {
                    if let Some(d) = deadline.as_mut() {
                        d.progressed();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => match deadline.as_mut() {
                    Some(d) => d.wait(what)?,
                    None => {
                        wait_for(self.fd, libc::POLLOUT, None).map_err(|e| PageError::io(format!("{what} (fd {})", self.fd), e))?;
                    }
                },
                Err(e) => return Err(PageError::io(format!("{what} (fd {})", self.fd), e)),
            }
        }
    }

    /// Send TLS close_notify (best effort, within the socket's send timeout): the peer then reads
    /// a clean end of stream rather than a cut connection.
    pub fn close_notify(&self) {
        let _order = lock(&self.send_lock);
        if self.check_attached().is_err() {
            return;
        }
        lock(&self.conn).send_close_notify();
        let mut deadline = SendDeadline::new(self.fd);
        let _ = self.flush(&mut deadline, "sending TLS close_notify");
    }

    // -- receiving -------------------------------------------------------------------------------

    /// Read plaintext into `dst` (at least one byte unless the stream ended: 0), waiting as
    /// `wait` says. With `peek` the bytes stay to be read again. A stream that fails its TLS
    /// checks is an error naming why; a peer that closed without close_notify reads as the end
    /// (its reason kept in [`failure`](Self::failure)).
    pub fn recv(&self, dst: &mut [u8], wait: Wait, peek: bool) -> Result<usize, RecvError> {
        if dst.is_empty() {
            return Ok(0);
        }
        let mut inbox = lock(&self.inbox);
        if !peek && !inbox.peeked.is_empty() {
            let n = dst.len().min(inbox.peeked.len());
            dst[..n].copy_from_slice(&inbox.peeked[..n]);
            inbox.peeked.drain(..n);
            return Ok(n);
        }
        loop {
            if peek && !inbox.peeked.is_empty() {
                let n = dst.len().min(inbox.peeked.len());
                dst[..n].copy_from_slice(&inbox.peeked[..n]);
                return Ok(n);
            }
            let target: &mut [u8] = if peek { &mut [] } else { dst };
            match self.take_plaintext(&mut inbox, target, peek)? {
                Some(n) if peek && n > 0 => continue, // now in the peek buffer
                Some(n) => return Ok(n),
                None => self.fill_inbox(&mut inbox, wait)?,
            }
        }
    }

    /// Decrypt what has arrived; Some(bytes) when plaintext was copied out (into `dst`, or with
    /// `peek` into the peek buffer) or the stream ended (0), None when more must arrive.
    fn take_plaintext(&self, inbox: &mut Inbox, dst: &mut [u8], peek: bool) -> Result<Option<usize>, RecvError> {
        let mut c = lock(&self.conn);
        loop {
            let result = if peek {
                let mut buf = [0u8; 4096];
                c.reader().read(&mut buf).inspect(|&n| inbox.peeked.extend_from_slice(&buf[..n]))
            } else {
                c.reader().read(dst)
            };
            match result {
                Ok(n) => return Ok(Some(n)), // 0: the peer's close_notify
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    self.fail("the peer closed the connection without ending TLS (close_notify)".into());
                    return Ok(Some(0));
                }
                Err(e) => return Err(RecvError::Io(e)),
            }
            if inbox.start < inbox.end {
                // The session takes at most one record's worth per call: feed it a few times
                // (until its buffer is full) and then decrypt them all.
                for _ in 0..8 {
                    let mut rest = &inbox.buf[inbox.start..inbox.end];
                    match c.read_tls(&mut rest) {
                        Ok(0) => break,
                        Ok(n) => inbox.start += n,
                        Err(_) => break, // its buffer is full: decrypt first
                    }
                    if inbox.start == inbox.end {
                        break;
                    }
                }
            } else if inbox.eof {
                let _ = c.read_tls(&mut &[][..]); // the end: a record cut short is now an error
            } else {
                return Ok(None);
            }
            if let Err(error) = c.process_new_packets() {
                let why = self.fail(stream_failure(&error));
                let _ = c.write_tls(&mut Socket { fd: self.fd, keep: None }); // the alert (best effort)
                return Err(RecvError::Tls(why));
            }
        }
    }

    /// Read more ciphertext from the socket (the caller holds the receive lock).
    fn fill_inbox(&self, inbox: &mut Inbox, wait: Wait) -> Result<(), RecvError> {
        self.check_attached().map_err(RecvError::Io)?;
        if inbox.start == inbox.end {
            (inbox.start, inbox.end) = (0, 0);
        } else if inbox.end == inbox.buf.len() {
            inbox.buf.copy_within(inbox.start..inbox.end, 0);
            (inbox.start, inbox.end) = (0, inbox.end - inbox.start);
        }
        let timeout = socket_timeout(self.fd, Direction::Receive);
        let mut since = Instant::now();
        loop {
            let end = inbox.end;
            match (Socket { fd: self.fd, keep: None }).read(&mut inbox.buf[end..]) {
                Ok(0) => {
                    inbox.eof = true;
                    return Ok(());
                }
                Ok(n) => {
                    inbox.end += n;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if wait == Wait::Never {
                        return Err(RecvError::Io(e));
                    }
                    let left = timeout.map(|t| t.saturating_sub(since.elapsed()));
                    if left.is_some_and(|l| l.is_zero()) || !wait_for(self.fd, libc::POLLIN, left).map_err(RecvError::Io)? {
                        return Err(RecvError::TimedOut(timeout.unwrap_or_default()));
                    }
                    if timeout.is_none() {
                        since = Instant::now();
                    }
                }
                Err(e) => {
                    self.fail(format!("the connection failed: {e}"));
                    return Err(RecvError::Io(e));
                }
            }
        }
    }

    /// Fill every byte the iovecs describe; returns how many arrived before the stream ended.
    ///
    /// # Safety
    /// Every iovec must describe memory writable for the whole call and not referenced as `&`/`&mut`.
    pub unsafe fn recv_iovecs(&self, iovs: &[libc::iovec], what: &str) -> Result<u64, PageError> {
        let mut got = 0u64;
        for v in iovs {
            // SAFETY: the caller's contract: writable memory nobody else references.
            let buf = unsafe { std::slice::from_raw_parts_mut(v.iov_base as *mut u8, v.iov_len) };
            let mut off = 0;
            while off < buf.len() {
                let n = self.recv(&mut buf[off..], Wait::Timeout, false).map_err(|e| e.into_page_error(self.fd, what))?;
                if n == 0 {
                    return Ok(got);
                }
                off += n;
                got += n as u64;
            }
        }
        Ok(got)
    }
}

/// Why a receive failed.
#[derive(Debug)]
pub enum RecvError {
    /// Nothing arrived for the socket's whole receive timeout.
    TimedOut(Duration),
    /// The records failed TLS's checks, or the peer's alert ended the stream: the reason.
    Tls(String),
    Io(io::Error),
}

impl RecvError {
    pub(super) fn into_page_error(self, fd: RawFd, what: &str) -> PageError {
        match self {
            RecvError::TimedOut(t) => timed_out(fd, what, Direction::Receive, t),
            RecvError::Tls(why) => PageError::io(format!("{what}: {why}"), io::Error::from_raw_os_error(libc::EPROTO)),
            RecvError::Io(e) => PageError::io(format!("{what} (fd {fd})"), e),
        }
    }
}

fn summarize(conn: &Connection, server_name: Option<&str>) -> (String, String) {
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
        Some(v) => format!("{v:?}"),
        None => "?".into(),
    };
    let suite = conn.negotiated_cipher_suite().map_or("?".to_string(), |s| format!("{:?}", s.suite()));
    let names = match server_name {
        // The client checked the server's certificate against the name it connected to.
        Some(name) => format!("valid for {name}"),
        None => {
            let leaf = conn.peer_certificates().and_then(|c| c.first());
            let dns: Vec<String> = leaf
                .and_then(|der| webpki::EndEntityCert::try_from(der).ok().map(|c| c.valid_dns_names().map(str::to_string).collect()))
                .unwrap_or_default();
            if dns.is_empty() {
                "no DNS names".into()
            } else {
                dns.join(", ")
            }
        }
    };
    (format!("encrypted with {version} ({suite})"), names)
}

#[cfg(test)]
#[path = "tls_tests.rs"]
mod tests;
