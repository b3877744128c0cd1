//! Mutual TLS 1.3 ended in the core: a connected socket and its TLS session as one object,
//! [`TlsStream`], which the frames above and the page batches here both read and write.
//!
//! rustls runs the handshake (its unbuffered API, on buffers of ours) and keeps the secrets
//! afterwards (`KernelConnection`: it derives each next key and takes session tickets); the
//! records after the handshake are sealed and opened here (`tls_records`), because rustls' own
//! record layer allocates and copies every record once more on each side. Page batches go
//! through a stream as they go through a plain fd (`fdio::Link`): each full record of their
//! bytes is sealed from guest memory straight into one buffer of records (a record that gathers
//! several parts is copied in and sealed in place), written with one send per `SEND_STEP`; a
//! received record is opened straight into the reader's buffer when it fits there, and otherwise
//! where it arrived and copied out. A page window is read as over a plain socket
//! (`stall::WholeReads`): the reader sleeps until the least ciphertext that can carry what it
//! still wants has arrived, not for every segment. There is no relay thread and no socketpair.
//!
//! The socket stays the caller's: it owns the fd, sets its SO_SNDTIMEO / SO_RCVTIMEO (honoured as
//! `stall` explains: a send's timeout counts from the last byte the peer took, a receive's from
//! the last byte that arrived) and may shut it down from another thread to wake whatever is
//! blocked here. One thread may send while another receives: the send side (its key and buffer)
//! is locked for whole writes, the receive side for whole reads; rustls is locked only to derive a
//! key or take a ticket. A send key is replaced (KeyUpdate) before it reaches the cipher suite's
//! confidentiality limit; a peer's KeyUpdate replaces the receive key, and the send key too when it
//! asks.
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
use std::io::{self, Read};
use std::ops::Range;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustls::client::{ClientConnectionData, ClientSessionStore, Resumption, UnbufferedClientConnection};
use rustls::crypto::{ring, CryptoProvider};
use rustls::kernel::KernelConnection;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ServerConnectionData, UnbufferedServerConnection, WebPkiClientVerifier};
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedConnectionCommon, UnbufferedStatus};
use rustls::{AlertDescription, CertificateError, ClientConfig, CommonState, RootCertStore, ServerConfig};

use super::stall::{poll_ms, socket_timeout, timed_out, SendDeadline};
use super::stall::{WholeReads, Woken};
use super::tls_records::{opened_len, record_len, RecordKey, Records, ALERT, APPLICATION_DATA, HANDSHAKE, HEADER, MAX_FRAGMENT, OVERHEAD};
use crate::digest::{Direction, PageError};

/// Ciphertext read from the socket at a time (at most): one syscall brings many records, and
/// the records of a lone stream's 1 MiB receive window (`RECV_WINDOW_PAGES`) fit, 1.4 KiB
/// longer than it.
const INBOX_BYTES: usize = (1 << 20) + (64 << 10);
/// Records sealed before they are written with one send: at most this much (and one record)
/// ciphertext waits in memory, small enough to stay in a core's cache until the kernel copies it.
/// While each record was copied in before it was sealed, 1 MiB took a fifth less CPU than 256
/// KiB (or 4 MiB) per GiB over loopback; sealed straight from guest memory, 512 KiB beat 1 MiB,
/// 2.32 against 2.16 GiB/s (docs/performance.md, "TLS in the core" and session 27).
const SEND_STEP: usize = 512 << 10;
/// Handshake message types after the handshake (RFC 8446 4).
const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;
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
        let mut config = match &self.key {
            Some(key) => builder
                .with_client_auth_cert(self.chain.clone(), key.clone_key())
                .map_err(|e| IdentityError { part: "key", why: e.to_string() })?,
            None => builder.with_no_client_auth(),
        };
        config.enable_secret_extraction = true; // the records are sealed and opened in tls_records
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
        config.enable_secret_extraction = true; // the records are sealed and opened in tls_records
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

/// Reads on the caller's socket without sleeping in the kernel (MSG_DONTWAIT): the waits happen
/// in poll(), outside any lock another thread needs. Keeps the first bytes read when asked.
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

/// One send(MSG_DONTWAIT | MSG_NOSIGNAL) of `buf`: how much the socket took.
fn send_some(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: buf is readable for the call; the kernel only reads it.
    let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
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

/// The receiving side: ciphertext read from the socket and not opened yet (`buf[start..end]`),
/// the plaintext of records opened and not read yet (`buf[plain]`, always before `start`: the
/// records are opened where they arrived), plaintext peeked at (or decrypted by rustls during the
/// handshake), the receive key, and how the stream ended or broke.
struct Inbox {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    plain: Range<usize>,
    peeked: Vec<u8>,
    key: RecordKey,
    /// The socket reached its end.
    eof: bool,
    /// Nothing more will be read: close_notify arrived, or the socket ended without it.
    ended: bool,
    /// Why the records failed TLS's checks: every later receive reports it.
    broken: Option<String>,
    /// Records opened straight into a reader's buffer, and where they arrived (for the tests).
    #[cfg(test)]
    opened: [u64; 2],
    /// Reads of the socket that brought bytes (for the tests).
    #[cfg(test)]
    reads: u64,
}

/// The sending side: the records being built (written with one send per `SEND_STEP`) and the
/// send key with how many records it may still protect.
struct Outbox {
    out: Outbuf,
    /// Where the record being filled starts in `out` (a send with more to follow leaves it open).
    open: Option<usize>,
    key: RecordKey,
    /// Records one key may protect (the suite's confidentiality limit): the last of them carries
    /// a KeyUpdate, and the records after it a new key.
    records_per_key: u64,
    /// Application data records sealed from where their bytes were, and copied in (for the tests).
    #[cfg(test)]
    sealed: [u64; 2],
}

impl Outbox {
    /// Seal the record being filled, if any.
    fn seal_open(&mut self) {
        if let Some(start) = self.open.take() {
            self.out.grow(OVERHEAD - HEADER);
            self.key.seal(self.out.since(start), APPLICATION_DATA);
            #[cfg(test)]
            {
                self.sealed[1] += 1;
            }
        }
    }
}

/// The sealed records waiting to be written, `buf[..len]`. The bytes after them are those of
/// records already written, kept rather than cleared: a record is sealed straight into them,
/// with no zeroing first.
struct Outbuf {
    buf: Vec<u8>,
    len: usize,
}

impl Outbuf {
    fn with_capacity(bytes: usize) -> Outbuf {
        Outbuf { buf: Vec::with_capacity(bytes), len: 0 }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// The bytes from `start` to the end.
    fn since(&mut self, start: usize) -> &mut [u8] {
        &mut self.buf[start..self.len]
    }

    fn clear(&mut self) {
        self.len = 0;
    }

    /// Drop the first `n` bytes (written); the rest move to the front.
    fn consume(&mut self, n: usize) {
        self.buf.copy_within(n..self.len, 0);
        self.len -= n;
    }
}

impl Records for Outbuf {
    fn grow(&mut self, n: usize) -> &mut [u8] {
        let at = self.len;
        if self.buf.len() < at + n {
            self.buf.resize(at + n, 0);
        }
        self.len = at + n;
        &mut self.buf[at..at + n]
    }
}

/// rustls after the handshake: it keeps the traffic secrets, derives the next keys on a
/// KeyUpdate, and takes the session tickets a server sends.
enum Kernel {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Kernel {
    fn next_key(&mut self, receive: bool) -> Result<RecordKey, rustls::Error> {
        let (seq, secrets) = match (self, receive) {
            (Kernel::Client(k), false) => k.update_tx_secret()?,
            (Kernel::Client(k), true) => k.update_rx_secret()?,
            (Kernel::Server(k), false) => k.update_tx_secret()?,
            (Kernel::Server(k), true) => k.update_rx_secret()?,
        };
        RecordKey::new(seq, secrets)
    }

    fn confidentiality_limit(&self) -> u64 {
        let suite = match self {
            Kernel::Client(k) => k.negotiated_cipher_suite(),
            Kernel::Server(k) => k.negotiated_cipher_suite(),
        };
        suite.tls13().map_or(u64::MAX, |s| s.common.confidentiality_limit)
    }
}

/// Where [`TlsStream::open_records`] left the plaintext it opened.
enum Opened {
    /// This many bytes of application data, at the start of the room it was given.
    Into(usize),
    /// In `inbox.plain`; or the stream ended.
    Inbox,
    /// Nowhere yet: the next record has not arrived whole.
    NotYet,
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
    /// Also the send lock: whole writes in order.
    outbox: Mutex<Outbox>,
    /// Also the receive lock.
    inbox: Mutex<Inbox>,
    kernel: Mutex<Kernel>,
    /// The peer asked for a new send key (its KeyUpdate had update_requested).
    update_wanted: AtomicBool,
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

/// What the handshake moves over the socket: bytes in (`incoming[..used]`), bytes out, the first
/// bytes received (to recognise a plaintext peer), and application data rustls decrypted before
/// the handshake was done with.
struct Handshake {
    fd: RawFd,
    deadline: Instant,
    incoming: Vec<u8>,
    used: usize,
    out: Vec<u8>,
    received: Vec<u8>,
    early: Vec<u8>,
}

/// What the handshake does after handling one state.
enum Step {
    Again,
    Read,
    Done,
    Failed(rustls::Error),
}

type Process<Data> = for<'c, 'i> fn(&'c mut UnbufferedConnectionCommon<Data>, &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Data>;

impl Handshake {
    fn left(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    fn tls(&mut self, error: rustls::Error) -> HandshakeFailure {
        HandshakeFailure::Tls { error, received: std::mem::take(&mut self.received) }
    }

    /// Drive rustls until the handshake is done and `accepted()` (a client: the server has
    /// accepted its certificate) or the peer already sent data, which it does only then.
    fn drive<Data>(
        &mut self,
        conn: &mut UnbufferedConnectionCommon<Data>,
        process: Process<Data>,
        accepted: &dyn Fn() -> bool,
    ) -> Result<(), HandshakeFailure> {
        loop {
            let UnbufferedStatus { discard, state } = process(conn, &mut self.incoming[..self.used]);
            let step = match state {
                Ok(ConnectionState::EncodeTlsData(mut e)) => loop {
                    let at = self.out.len();
                    self.out.resize(at + (4 << 10), 0);
                    match e.encode(&mut self.out[at..]) {
                        Ok(n) => {
                            self.out.truncate(at + n);
                            break Step::Again;
                        }
                        Err(EncodeError::InsufficientSize(s)) => self.out.resize(at + s.required_size, 0),
                        Err(EncodeError::AlreadyEncoded) => {
                            self.out.truncate(at);
                            break Step::Again;
                        }
                    }
                    self.out.truncate(at);
                },
                Ok(ConnectionState::TransmitTlsData(t)) => {
                    self.transmit()?;
                    t.done();
                    Step::Again
                }
                Ok(ConnectionState::BlockedHandshake) => Step::Read,
                Ok(ConnectionState::WriteTraffic(_)) if accepted() || !self.early.is_empty() => Step::Done,
                Ok(ConnectionState::WriteTraffic(_)) => Step::Read,
                Ok(ConnectionState::ReadTraffic(mut r)) => {
                    let mut step = Step::Again;
                    while let Some(record) = r.next_record() {
                        match record {
                            Ok(record) => self.early.extend_from_slice(record.payload),
                            Err(error) => {
                                step = Step::Failed(error);
                                break;
                            }
                        }
                    }
                    step
                }
                Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => {
                    return Err(HandshakeFailure::Closed { received: std::mem::take(&mut self.received) })
                }
                Ok(other) => Step::Failed(rustls::Error::General(format!("unexpected handshake state {other:?}"))),
                Err(error) => Step::Failed(error),
            };
            self.incoming.copy_within(discard..self.used, 0);
            self.used -= discard;
            match step {
                Step::Again => {}
                Step::Done => return Ok(()),
                Step::Read => self.read_more()?,
                Step::Failed(error) => {
                    // rustls queued the alert that tells the peer why (best effort: the
                    // connection is given up).
                    let UnbufferedStatus { state, .. } = process(conn, &mut self.incoming[..self.used]);
                    if let Ok(ConnectionState::EncodeTlsData(mut e)) = state {
                        let mut alert = [0u8; 256];
                        if let Ok(n) = e.encode(&mut alert) {
                            let _ = send_some(self.fd, &alert[..n]);
                        }
                    }
                    return Err(self.tls(error));
                }
            }
        }
    }

    fn transmit(&mut self) -> Result<(), HandshakeFailure> {
        let mut sent = 0;
        while sent < self.out.len() {
            match send_some(self.fd, &self.out[sent..]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !wait_for(self.fd, libc::POLLOUT, Some(self.left())).map_err(HandshakeFailure::Io)? {
                        return Err(HandshakeFailure::TimedOut);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(HandshakeFailure::Io(e)),
            }
        }
        self.out.clear();
        Ok(())
    }

    fn read_more(&mut self) -> Result<(), HandshakeFailure> {
        if self.used == self.incoming.len() {
            return Err(self.tls(rustls::Error::General("a handshake message larger than the receive buffer".into())));
        }
        loop {
            if !wait_for(self.fd, libc::POLLIN, Some(self.left())).map_err(HandshakeFailure::Io)? {
                return Err(HandshakeFailure::TimedOut);
            }
            let used = self.used;
            match (Socket { fd: self.fd, keep: Some(&mut self.received) }).read(&mut self.incoming[used..]) {
                Ok(0) => return Err(HandshakeFailure::Closed { received: std::mem::take(&mut self.received) }),
                Ok(n) => {
                    self.used += n;
                    return Ok(());
                }
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
                Err(e) => return Err(HandshakeFailure::Io(e)),
            }
        }
    }
}

impl TlsStream {
    /// Run the handshake on the connected, blocking socket `fd` (the caller's; it stays open and
    /// the caller's) within `timeout`. Ciphertext that arrived with the handshake's last records
    /// is kept for the first receive.
    pub fn handshake(fd: RawFd, side: Side, timeout: Duration) -> Result<TlsStream, HandshakeFailure> {
        let mut hs = Handshake {
            fd,
            deadline: Instant::now() + timeout,
            incoming: vec![0; INBOX_BYTES],
            used: 0,
            out: Vec::new(),
            received: Vec::new(),
            early: Vec::new(),
        };
        let (secrets, kernel, (summary, peer_names)) = match side {
            Side::Client { config, server_name } => {
                let name = ServerName::try_from(server_name.clone())
                    .map_err(|e| hs.tls(rustls::Error::General(format!("{server_name:?} is not a host name or address: {e}"))))?;
                let ticket = Arc::new(TicketSeen::default());
                let mut config = (*config).clone();
                config.resumption = Resumption::store(ticket.clone());
                let mut conn = UnbufferedClientConnection::new(Arc::new(config), name).map_err(|e| hs.tls(e))?;
                hs.drive(&mut conn, UnbufferedConnectionCommon::<ClientConnectionData>::process_tls_records, &|| {
                    ticket.0.load(Ordering::Acquire)
                })?;
                let names = summarize(&conn, Some(&server_name));
                let (secrets, kernel) = conn.dangerous_into_kernel_connection().map_err(|e| hs.tls(e))?;
                (secrets, Kernel::Client(kernel), names)
            }
            Side::Server { config } => {
                let mut conn = UnbufferedServerConnection::new(config).map_err(|e| hs.tls(e))?;
                hs.drive(&mut conn, UnbufferedConnectionCommon::<ServerConnectionData>::process_tls_records, &|| true)?;
                let names = summarize(&conn, None);
                let (secrets, kernel) = conn.dangerous_into_kernel_connection().map_err(|e| hs.tls(e))?;
                (secrets, Kernel::Server(kernel), names)
            }
        };
        let send_key = RecordKey::new(secrets.tx.0, secrets.tx.1).map_err(|e| hs.tls(e))?;
        let receive_key = RecordKey::new(secrets.rx.0, secrets.rx.1).map_err(|e| hs.tls(e))?;
        let summary = format!("{summary}; records by {}", send_key.describe());
        let records_per_key = kernel.confidentiality_limit();
        Ok(TlsStream {
            fd,
            outbox: Mutex::new(Outbox {
                out: Outbuf::with_capacity(SEND_STEP + MAX_FRAGMENT + 4 * OVERHEAD),
                open: None,
                key: send_key,
                records_per_key,
                #[cfg(test)]
                sealed: [0; 2],
            }),
            inbox: Mutex::new(Inbox {
                buf: hs.incoming,
                start: 0,
                end: hs.used,
                plain: 0..0,
                peeked: hs.early,
                key: receive_key,
                eof: false,
                ended: false,
                broken: None,
                #[cfg(test)]
                opened: [0; 2],
                #[cfg(test)]
                reads: 0,
            }),
            kernel: Mutex::new(kernel),
            update_wanted: AtomicBool::new(false),
            failure: Mutex::new(None),
            detached: AtomicBool::new(false),
            summary,
            peer_names,
        })
    }

    pub fn fd(&self) -> RawFd {
        self.fd
    }

    /// Protocol, cipher suite and the library that seals the records, as "encrypted with TLSv1.3
    /// (TLS13_AES_128_GCM_SHA256); records by ring (7.04 GiB/s a core here, aws-lc-rs 3.85)".
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

    /// Plaintext received and not yet read (a read would not wait for it; an end or a failure
    /// that a read would report at once counts as one byte).
    pub fn pending(&self) -> usize {
        // A reader blocked in another thread holds the inbox: then nothing is waiting unread.
        let Ok(mut inbox) = self.inbox.try_lock() else { return 0 };
        let ready = self.open_records(&mut inbox, &mut []).map_or(true, |opened| !matches!(opened, Opened::NotYet));
        let waiting = inbox.peeked.len() + inbox.plain.len();
        if waiting == 0 && ready {
            1
        } else {
            waiting
        }
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
    /// with. Records are filled to the maximum across parts, sealed in one buffer straight from
    /// `parts`, and written one `SEND_STEP` at a time. The socket's SO_SNDTIMEO counts from the
    /// last byte the peer took.
    pub fn send_parts(&self, parts: &[&[u8]], what: &str) -> Result<(), PageError> {
        self.send_parts_more(parts, what, false)
    }

    /// [`send_parts`](Self::send_parts); with `more`, the caller's next send follows at once (the
    /// next window of the same page batch): what does not fill a `SEND_STEP` then waits for it,
    /// the record being filled included, so records stay full and writes large. The last send
    /// of a run must be without `more`.
    pub fn send_parts_more(&self, parts: &[&[u8]], what: &str, more: bool) -> Result<(), PageError> {
        let mut outbox = lock(&self.outbox);
        self.check_attached().map_err(|e| PageError::io(what.to_string(), e))?;
        let mut deadline = SendDeadline::new(self.fd);
        for part in parts {
            let mut rest = *part;
            while !rest.is_empty() {
                let full = match outbox.open {
                    // A whole record of this part: sealed from where it is.
                    None if rest.len() >= MAX_FRAGMENT => {
                        self.before_record(&mut outbox, what)?;
                        let Outbox { out, key, .. } = &mut *outbox;
                        key.seal_from(out.grow(MAX_FRAGMENT + OVERHEAD), &rest[..MAX_FRAGMENT], APPLICATION_DATA);
                        rest = &rest[MAX_FRAGMENT..];
                        #[cfg(test)]
                        {
                            outbox.sealed[0] += 1;
                        }
                        true
                    }
                    // A record that gathers parts: copied in, sealed once full (or at the end).
                    open => {
                        let start = match open {
                            Some(start) => start,
                            None => {
                                self.before_record(&mut outbox, what)?;
                                let start = outbox.out.len();
                                outbox.out.grow(HEADER);
                                *outbox.open.insert(start)
                            }
                        };
                        let filled = outbox.out.len() - start - HEADER;
                        let n = (MAX_FRAGMENT - filled).min(rest.len());
                        outbox.out.grow(n).copy_from_slice(&rest[..n]);
                        rest = &rest[n..];
                        if filled + n == MAX_FRAGMENT {
                            outbox.seal_open();
                        }
                        filled + n == MAX_FRAGMENT
                    }
                };
                if full && outbox.out.len() >= SEND_STEP {
                    self.flush(&mut outbox, &mut deadline, what)?;
                }
            }
        }
        if more {
            return Ok(());
        }
        outbox.seal_open();
        self.flush(&mut outbox, &mut deadline, what)
    }

    /// Before a new record: when the send key has one record left (or the peer asked), that one
    /// carries a KeyUpdate and the key changes (RFC 8446 4.6.3).
    fn before_record(&self, outbox: &mut Outbox, what: &str) -> Result<(), PageError> {
        let asked = self.update_wanted.swap(false, Ordering::AcqRel);
        if !asked && outbox.key.seq + 1 < outbox.records_per_key {
            return Ok(());
        }
        let Outbox { out, key, .. } = outbox;
        key.seal_record(out, HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 0]); // update_not_requested
        *key = lock(&self.kernel)
            .next_key(false)
            .map_err(|e| PageError::io(format!("{what}: TLS: {}", describe(&e)), io::Error::from_raw_os_error(libc::EPROTO)))?;
        Ok(())
    }

    /// Write the sealed records to the socket (the caller holds the send lock).
    fn flush(&self, outbox: &mut Outbox, deadline: &mut Option<SendDeadline>, what: &str) -> Result<(), PageError> {
        debug_assert!(outbox.open.is_none(), "only sealed records are written");
        let mut sent = 0;
        while sent < outbox.out.len() {
            match send_some(self.fd, &outbox.out.bytes()[sent..]) {
                Ok(n) => {
                    sent += n;
                    if let Some(d) = deadline.as_mut() {
                        d.progressed();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let waited = match deadline.as_mut() {
                        Some(d) => d.wait(what),
                        None => wait_for(self.fd, libc::POLLOUT, None)
                            .map(|_| ())
                            .map_err(|e| PageError::io(format!("{what} (fd {})", self.fd), e)),
                    };
                    if let Err(e) = waited {
                        // The records not written stay first in line, whole, for a later send.
                        outbox.out.consume(sent);
                        return Err(e);
                    }
                }
                Err(e) => {
                    outbox.out.consume(sent);
                    return Err(PageError::io(format!("{what} (fd {})", self.fd), e));
                }
            }
        }
        outbox.out.clear();
        Ok(())
    }

    /// Send TLS close_notify (best effort, within the socket's send timeout): the peer then reads
    /// a clean end of stream rather than a cut connection.
    pub fn close_notify(&self) {
        let mut outbox = lock(&self.outbox);
        if self.check_attached().is_err() {
            return;
        }
        outbox.seal_open();
        let Outbox { out, key, .. } = &mut *outbox;
        key.seal_record(out, ALERT, &[1, 0]); // warning, close_notify
        let mut deadline = SendDeadline::new(self.fd);
        let _ = self.flush(&mut outbox, &mut deadline, "sending TLS close_notify");
    }

    // -- receiving -------------------------------------------------------------------------------

    /// Read plaintext into `dst` (at least one byte unless the stream ended: 0), waiting as
    /// `wait` says. With `peek` the bytes stay to be read again. A stream that fails its TLS
    /// checks is an error naming why; a peer that closed without close_notify reads as the end
    /// (its reason kept in [`failure`](Self::failure)). The bytes of `dst` after the count may be
    /// overwritten: a record opened into `dst` leaves its inner content type and padding there
    /// (and, when it fails its tag, bytes of no meaning where its plaintext would have been).
    pub fn recv(&self, dst: &mut [u8], wait: Wait, peek: bool) -> Result<usize, RecvError> {
        self.recv_wanting(dst, wait, peek, None)
    }

    /// [`recv`](Self::recv); with `lowat`, a reader that wants this many bytes more (`dst` and
    /// what follows it, all sure to come) sleeps until their ciphertext has arrived, or as much
    /// of it as the inbox holds, instead of being woken for every segment ([`WholeReads`]).
    fn recv_wanting(
        &self,
        dst: &mut [u8],
        wait: Wait,
        peek: bool,
        mut lowat: Option<(&mut WholeReads, usize)>,
    ) -> Result<usize, RecvError> {
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
            match self.take_plaintext(&mut inbox, dst, peek)? {
                Some(n) if peek && n > 0 => continue, // now in the peek buffer
                Some(n) => return Ok(n),
                None => self.fill_inbox(&mut inbox, wait, lowat.as_mut().map(|(whole, want)| (&mut **whole, *want)))?,
            }
        }
    }

    /// Take the plaintext of the records that arrived whole, opening them as needed: a record
    /// whose plaintext fits in what is left of `dst` is opened straight into it, another where it
    /// arrived and copied out. Some(bytes) when plaintext was taken (into `dst`, or with `peek`
    /// into the peek buffer) or the stream ended (0), None when more must arrive.
    fn take_plaintext(&self, inbox: &mut Inbox, dst: &mut [u8], peek: bool) -> Result<Option<usize>, RecvError> {
        let mut copied = 0;
        while copied < dst.len() {
            let room: &mut [u8] = if peek { &mut [] } else { &mut dst[copied..] };
            match self.open_records(inbox, room)? {
                Opened::Into(n) => {
                    copied += n;
                    continue;
                }
                Opened::NotYet => break,
                Opened::Inbox => {}
            }
            let Inbox { buf, plain, peeked, .. } = inbox;
            if Range::is_empty(plain) {
                break; // the end
            }
            if peek {
                peeked.extend_from_slice(&buf[plain.clone()]);
                copied += plain.len();
                *plain = 0..0;
                break;
            }
            let n = (dst.len() - copied).min(plain.len());
            dst[copied..copied + n].copy_from_slice(&buf[plain.start..plain.start + n]);
            plain.start += n;
            copied += n;
        }
        if copied == 0 && !inbox.ended {
            return Ok(None);
        }
        Ok(Some(copied))
    }

    /// Open the records that arrived whole until one holds plaintext, the stream ended or the next
    /// record has not arrived whole. A record whose plaintext fits in `room` is opened there,
    /// another where it arrived (`inbox.plain`). Alerts, session tickets and key updates are
    /// handled on the way.
    fn open_records(&self, inbox: &mut Inbox, room: &mut [u8]) -> Result<Opened, RecvError> {
        if let Some(why) = &inbox.broken {
            return Err(RecvError::Tls(why.clone()));
        }
        while Range::is_empty(&inbox.plain) && !inbox.ended {
            let at = inbox.start;
            let len = match record_len(&inbox.buf[at..inbox.end]) {
                Ok(Some(len)) if at + len <= inbox.end => len,
                Ok(_) if inbox.eof => {
                    // Nothing more comes: the peer closed without close_notify, perhaps inside a
                    // record.
                    self.fail("the peer closed the connection without ending TLS (close_notify)".into());
                    inbox.ended = true;
                    break;
                }
                Ok(_) => return Ok(Opened::NotYet),
                Err(error) => return Err(self.broken(inbox, error)),
            };
            inbox.start += len;
            let record = at..at + len;
            let inner = opened_len(len);
            let opened = if inner <= room.len() {
                inbox.key.open_into(&inbox.buf[record], &mut room[..inner]).map(|(kind, n)| (kind, None, n))
            } else {
                inbox.key.open(&mut inbox.buf[record]).map(|(kind, r)| (kind, Some(at + r.start), r.len()))
            };
            let (content_type, in_inbox, n) = match opened {
                Ok(opened) => opened,
                Err(error) => return Err(self.broken(inbox, error)),
            };
            #[cfg(test)]
            {
                inbox.opened[usize::from(in_inbox.is_some())] += 1;
            }
            let content = |inbox: &Inbox| match in_inbox {
                Some(from) => inbox.buf[from..from + n].to_vec(),
                None => room[..n].to_vec(),
            };
            let handled = match content_type {
                APPLICATION_DATA => match in_inbox {
                    Some(from) => {
                        inbox.plain = from..from + n;
                        Ok(())
                    }
                    None => return Ok(Opened::Into(n)),
                },
                ALERT => match content(inbox).as_slice() {
                    [_, 0] => {
                        inbox.ended = true; // close_notify
                        Ok(())
                    }
                    [_, 90] => Ok(()), // user_canceled: close_notify follows
                    [_, description] => Err(rustls::Error::AlertReceived(AlertDescription::from(*description))),
                    _ => Err(rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidEmptyPayload)),
                },
                // RFC 8446 5.1: no zero-length fragments of handshake messages.
                HANDSHAKE if n == 0 => Err(rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidEmptyPayload)),
                HANDSHAKE => {
                    let messages = content(inbox);
                    self.after_handshake(inbox, &messages)
                }
                _ => Err(rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType)),
            };
            if let Err(error) = handled {
                return Err(self.broken(inbox, error));
            }
        }
        Ok(Opened::Inbox)
    }

    /// Handshake messages after the handshake: a server's session ticket (a client keeps none,
    /// `TicketSeen`), a KeyUpdate (the receive key changes; the send key too when asked).
    fn after_handshake(&self, inbox: &mut Inbox, mut messages: &[u8]) -> Result<(), rustls::Error> {
        while !messages.is_empty() {
            let (kind, body, rest) = match messages {
                [kind, a, b, c, rest @ ..] if usize::from(*a) << 16 | usize::from(*b) << 8 | usize::from(*c) <= rest.len() => {
                    let len = usize::from(*a) << 16 | usize::from(*b) << 8 | usize::from(*c);
                    (*kind, &rest[..len], &rest[len..])
                }
                _ => return Err(rustls::Error::General("a handshake message split across records after the handshake".into())),
            };
            messages = rest;
            let mut kernel = lock(&self.kernel);
            match (kind, &mut *kernel, body) {
                (NEW_SESSION_TICKET, Kernel::Client(k), _) => k.handle_new_session_ticket(body)?,
                (KEY_UPDATE, kernel, [request @ (0 | 1)]) if rest.is_empty() => {
                    inbox.key = kernel.next_key(true)?;
                    if *request == 1 {
                        self.update_wanted.store(true, Ordering::Release);
                    }
                }
                (KEY_UPDATE, ..) => return Err(rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidKeyUpdate)),
                _ => {
                    return Err(rustls::Error::InappropriateHandshakeMessage {
                        expect_types: vec![rustls::HandshakeType::KeyUpdate],
                        got_type: rustls::HandshakeType::from(kind),
                    })
                }
            }
        }
        Ok(())
    }

    /// The records failed TLS's checks: every later receive says why, and the peer is told
    /// (best effort: the send side may be busy, and the connection is given up anyway).
    fn broken(&self, inbox: &mut Inbox, error: rustls::Error) -> RecvError {
        let why = self.fail(stream_failure(&error));
        inbox.broken = Some(why.clone());
        let description = match error {
            rustls::Error::DecryptError => AlertDescription::BadRecordMac,
            rustls::Error::PeerSentOversizedRecord => AlertDescription::RecordOverflow,
            _ => AlertDescription::UnexpectedMessage,
        };
        if let Ok(mut outbox) = self.outbox.try_lock() {
            // Only between whole records: nothing of an earlier send may still wait in line.
            if outbox.out.is_empty() && outbox.open.is_none() && self.check_attached().is_ok() {
                let mut alert = Vec::new();
                outbox.key.seal_record(&mut alert, ALERT, &[2, u8::from(description)]);
                let _ = send_some(self.fd, &alert);
            }
        }
        RecvError::Tls(why)
    }

    /// Read more ciphertext from the socket (the caller holds the receive lock; every record
    /// opened has been read); with `lowat`, once what the reader wants has arrived (see
    /// [`recv_wanting`](Self::recv_wanting)).
    fn fill_inbox(&self, inbox: &mut Inbox, wait: Wait, lowat: Option<(&mut WholeReads, usize)>) -> Result<(), RecvError> {
        self.check_attached().map_err(RecvError::Io)?;
        inbox.plain = 0..0;
        // With `lowat`: the ciphertext of the bytes wanted, less what is already here, is sure to come.
        let here = inbox.end - inbox.start;
        let missing = lowat.as_ref().map_or(0, |&(_, want)| least_ciphertext(want).saturating_sub(here));
        if here == 0 {
            (inbox.start, inbox.end) = (0, 0);
        } else if inbox.end == inbox.buf.len() || inbox.buf.len() - inbox.end < missing {
            // Room for one read of everything still missing: the part of a record here moves to the front.
            inbox.buf.copy_within(inbox.start..inbox.end, 0);
            (inbox.start, inbox.end) = (0, here);
        }
        // With `lowat`, each read waits first until what is missing has arrived (or as much as
        // the inbox holds); without, it reads what is there and waits only when nothing is.
        let room = inbox.buf.len() - inbox.end;
        let mut lowat = lowat.map(|(whole, _)| (whole, missing.min(room)));
        let timeout = socket_timeout(self.fd, Direction::Receive);
        let mut since = Instant::now();
        loop {
            if let Some((whole, missing)) = lowat.as_mut() {
                if let Woken::TimedOut(timeout) = whole.sleep(*missing).map_err(RecvError::Io)? {
                    return Err(RecvError::TimedOut(timeout));
                }
            }
            let end = inbox.end;
            match (Socket { fd: self.fd, keep: None }).read(&mut inbox.buf[end..]) {
                Ok(0) => {
                    inbox.eof = true;
                    return Ok(());
                }
                Ok(n) => {
                    inbox.end += n;
                    #[cfg(test)]
                    {
                        inbox.reads += 1;
                    }
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && lowat.is_some() => {} // woken early: sleep again
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
    /// As with [`recv`](Self::recv), bytes after those that arrived may be overwritten.
    ///
    /// # Safety
    /// Every iovec must describe memory writable for the whole call and not referenced as `&`/`&mut`.
    pub(super) unsafe fn recv_iovecs(
        &self,
        iovs: &[libc::iovec],
        what: &str,
        mut whole: Option<&mut WholeReads>,
    ) -> Result<u64, PageError> {
        let mut got = 0u64;
        let mut left: usize = iovs.iter().map(|v| v.iov_len).sum();
        for v in iovs {
            // SAFETY: the caller's contract: writable memory nobody else references.
            let buf = unsafe { std::slice::from_raw_parts_mut(v.iov_base as *mut u8, v.iov_len) };
            let mut off = 0;
            while off < buf.len() {
                let lowat = whole.as_deref_mut().map(|w| (w, left));
                let n = self.recv_wanting(&mut buf[off..], Wait::Timeout, false, lowat).map_err(|e| e.into_page_error(self.fd, what))?;
                if n == 0 {
                    return Ok(got);
                }
                off += n;
                got += n as u64;
                left -= n;
            }
        }
        Ok(got)
    }

    /// [`send_parts_more`](Self::send_parts_more) for iovecs.
    ///
    /// # Safety
    /// Every iovec must describe memory readable for the whole call.
    pub unsafe fn send_iovecs(&self, iovs: &[libc::iovec], what: &str, more: bool) -> Result<(), PageError> {
        // SAFETY: the caller's contract: each iovec is readable memory for the call.
        let parts: Vec<&[u8]> = iovs
            .iter()
            .filter(|v| v.iov_len > 0)
            .map(|v| unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) })
            .collect();
        self.send_parts_more(&parts, what, more)
    }
}

/// The fewest bytes of ciphertext that can carry `plain` bytes of application data: records
/// hold at most MAX_FRAGMENT bytes of it each, and seal each into OVERHEAD bytes more (more where
/// a peer pads them, or sends other records between).
fn least_ciphertext(plain: usize) -> usize {
    plain + plain.div_ceil(MAX_FRAGMENT) * OVERHEAD
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

fn summarize(conn: &CommonState, server_name: Option<&str>) -> (String, String) {
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
pub(super) mod tests;
