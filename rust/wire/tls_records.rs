//! TLS 1.3 record protection (RFC 8446, section 5) for the stream `tls` runs once rustls has
//! finished the handshake: rustls keeps the secrets and derives each new key
//! (`KernelConnection`), the records themselves are sealed and opened here, in buffers the
//! caller owns. That is what lets a send encrypt guest memory straight into one large write
//! buffer, and a receive decrypt a record straight into the reader's buffer (or where it arrived,
//! when it does not fit there).
//! rustls' own record layer allocates a buffer per record on both sides and copies each one more
//! time (docs/performance.md, "TLS in the core").
//!
//! Two libraries can seal and open the records, and which is faster depends on the CPU:
//! aws-lc-rs has AES-GCM for AVX-512 (14 GiB/s on one core of a Xeon with it, ring 8.3), ring for
//! VAES with AVX2 alone (7.0 GiB/s on one core of an AMD Zen 3, aws-lc-rs 3.8, which falls back
//! to AES-NI there). So each process times both once, on a few records, and keeps the faster
//! ([`Backend::chosen`]); a record is AES-GCM whichever library sealed it, so the two ends need
//! not agree. aws-lc-rs reads the plaintext where it is and writes the record (scatter and
//! gather); ring works in place, so with it a record's bytes are copied in first (sealing) or
//! the ciphertext is copied to where the plaintext goes (opening), one copy of 16 KiB that stays
//! in the cache.

use std::sync::OnceLock;
use std::time::Instant;

use aws_lc_rs::aead as aws;
use ring::aead as rg;
use rustls::ConnectionTrafficSecrets;

const NONCE_LEN: usize = 12;

/// The most plaintext one record carries (2^14 bytes).
pub(super) const MAX_FRAGMENT: usize = 1 << 14;
/// The record header: content type, legacy version, length.
pub(super) const HEADER: usize = 5;
const TAG: usize = 16;
/// A record longer than this is refused (RFC 8446 5.2: 2^14 + 256).
const MAX_CIPHERTEXT: usize = MAX_FRAGMENT + 256;
/// Everything a record adds to its plaintext: header, inner content type, tag.
pub(super) const OVERHEAD: usize = HEADER + 1 + TAG;

pub(super) const ALERT: u8 = 21;
pub(super) const HANDSHAKE: u8 = 22;
pub(super) const APPLICATION_DATA: u8 = 23;

/// The AEADs a TLS 1.3 record layer can be asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Aead {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

/// The library that seals and opens records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Backend {
    AwsLc,
    Ring,
}

/// What one process measured when it chose the library for an AEAD: each one's GiB/s on one core,
/// the best of a few alternated trials, sealing records from memory as a send does.
#[derive(Clone, Copy, Debug)]
pub(super) struct Choice {
    pub(super) backend: Backend,
    pub(super) aws_lc_gib_s: f64,
    pub(super) ring_gib_s: f64,
}

/// Plaintext sealed in one trial: four full records, small enough to stay in the cache so the
/// trial times the cipher and not the memory, and short (tens of microseconds).
const TRIAL_RECORDS: usize = 4;
/// Trials of each library, alternated: a trial a neighbour's time slice fell in is not the best.
const TRIALS: usize = 5;

impl Backend {
    pub(super) fn name(self) -> &'static str {
        match self {
            Backend::AwsLc => "aws-lc-rs",
            Backend::Ring => "ring",
        }
    }

    /// The faster library for `aead` on this CPU, timed once per process (about 0.2 ms, at the
    /// first key of that AEAD), on sealing: opening costs the same pass of the cipher and, with
    /// ring, the same one copy. A tie keeps aws-lc-rs.
    pub(super) fn chosen(aead: Aead) -> Choice {
        static CHOSEN: [OnceLock<Choice>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];
        *CHOSEN[aead as usize].get_or_init(|| Backend::time(aead))
    }

    fn time(aead: Aead) -> Choice {
        // A throwaway key that protects nothing: both libraries' keys are the same key and IV
        // from the same sequence number, so their nonces repeat between them.
        let secret = [0x5au8; 32];
        let body: Vec<u8> = (0..MAX_FRAGMENT).map(|i| (i * 7 + 3) as u8).collect();
        let mut out = vec![0u8; TRIAL_RECORDS * (MAX_FRAGMENT + OVERHEAD)];
        let mut keys = [Backend::AwsLc, Backend::Ring]
            .map(|b| RecordKey::with(b, aead, &secret[..aead.key_len()], [1; NONCE_LEN], 0).expect("a key of the AEAD's own length"));
        let mut best = [f64::MAX; 2];
        // The first pass of each warms the code and the buffers and is not counted.
        for pass in 0..=TRIALS {
            for (key, best) in keys.iter_mut().zip(best.iter_mut()) {
                let started = Instant::now();
                for record in out.chunks_exact_mut(MAX_FRAGMENT + OVERHEAD) {
                    key.seal_from(record, &body, APPLICATION_DATA);
                }
                let seconds = started.elapsed().as_secs_f64();
                if pass > 0 {
                    *best = best.min(seconds);
                }
            }
        }
        let gib_s = |s: f64| (TRIAL_RECORDS * MAX_FRAGMENT) as f64 / s.max(1e-9) / (1u64 << 30) as f64;
        let (aws_lc_gib_s, ring_gib_s) = (gib_s(best[0]), gib_s(best[1]));
        let backend = if ring_gib_s > aws_lc_gib_s { Backend::Ring } else { Backend::AwsLc };
        Choice { backend, aws_lc_gib_s, ring_gib_s }
    }
}

impl Aead {
    fn key_len(self) -> usize {
        match self {
            Aead::Aes128Gcm => 16,
            Aead::Aes256Gcm | Aead::Chacha20Poly1305 => 32,
        }
    }
}

/// An AEAD key of either library (ring's holds its AES key schedule and GHASH table inline, 544
/// bytes, so it is boxed).
enum Key {
    AwsLc(aws::LessSafeKey),
    Ring(Box<rg::LessSafeKey>),
}

/// One direction's record key: the AEAD key and IV rustls derived and the record sequence number.
pub(super) struct RecordKey {
    key: Key,
    aead: Aead,
    iv: [u8; NONCE_LEN],
    pub(super) seq: u64,
}

impl RecordKey {
    /// From the secrets rustls hands over (`ExtractedSecrets`, `KernelConnection::update_*`),
    /// sealed and opened by the library this process found faster for the AEAD.
    pub(super) fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> Result<RecordKey, rustls::Error> {
        let (aead, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Aead::Aes128Gcm, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Aead::Aes256Gcm, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (Aead::Chacha20Poly1305, key, iv),
            _ => return Err(rustls::Error::General("no record layer for the negotiated cipher suite".into())),
        };
        let iv: [u8; NONCE_LEN] = iv.as_ref().try_into().map_err(|_| rustls::Error::General("bad traffic IV length".into()))?;
        RecordKey::with(Backend::chosen(aead).backend, aead, key.as_ref(), iv, seq)
    }

    /// A key of `backend` for `aead`.
    pub(super) fn with(backend: Backend, aead: Aead, key: &[u8], iv: [u8; NONCE_LEN], seq: u64) -> Result<RecordKey, rustls::Error> {
        let bad = || rustls::Error::General("bad traffic key length".into());
        let key = match backend {
            Backend::AwsLc => {
                let alg = match aead {
                    Aead::Aes128Gcm => &aws::AES_128_GCM,
                    Aead::Aes256Gcm => &aws::AES_256_GCM,
                    Aead::Chacha20Poly1305 => &aws::CHACHA20_POLY1305,
                };
                Key::AwsLc(aws::LessSafeKey::new(aws::UnboundKey::new(alg, key).map_err(|_| bad())?))
            }
            Backend::Ring => {
                let alg = match aead {
                    Aead::Aes128Gcm => &rg::AES_128_GCM,
                    Aead::Aes256Gcm => &rg::AES_256_GCM,
                    Aead::Chacha20Poly1305 => &rg::CHACHA20_POLY1305,
                };
                Key::Ring(Box::new(rg::LessSafeKey::new(rg::UnboundKey::new(alg, key).map_err(|_| bad())?)))
            }
        };
        Ok(RecordKey { key, aead, iv, seq })
    }

    /// The library that seals and opens this key's records.
    pub(super) fn backend(&self) -> Backend {
        match self.key {
            Key::AwsLc(_) => Backend::AwsLc,
            Key::Ring(_) => Backend::Ring,
        }
    }

    /// Which library seals this key's records and, where this process chose it, what each one
    /// sealed on one core when it chose: "ring (7.04 GiB/s a core here, aws-lc-rs 3.85)".
    pub(super) fn describe(&self) -> String {
        let choice = Backend::chosen(self.aead);
        let name = self.backend().name();
        if choice.backend != self.backend() {
            return name.to_string();
        }
        let (mine, other, theirs) = match choice.backend {
            Backend::AwsLc => (choice.aws_lc_gib_s, Backend::Ring, choice.ring_gib_s),
            Backend::Ring => (choice.ring_gib_s, Backend::AwsLc, choice.aws_lc_gib_s),
        };
        format!("{name} ({mine:.2} GiB/s a core here, {} {theirs:.2})", other.name())
    }

    /// The per-record nonce: the IV XOR the sequence number (RFC 8446 5.3); the number advances.
    fn next_nonce(&mut self) -> [u8; NONCE_LEN] {
        let mut nonce = self.iv;
        for (n, s) in nonce[NONCE_LEN - 8..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq += 1;
        nonce
    }

    /// Seal the record `record` holds: `HEADER` bytes reserved, its plaintext, then room for the
    /// inner content type and the tag (`OVERHEAD` bytes in all beside the plaintext).
    pub(super) fn seal(&mut self, record: &mut [u8], content_type: u8) {
        let header = self.header(record.len());
        let (head, body) = record.split_at_mut(HEADER);
        head.copy_from_slice(&header);
        let (inner, tag) = body.split_at_mut(body.len() - TAG);
        inner[inner.len() - 1] = content_type;
        let nonce = self.next_nonce();
        const SEALS: &str = "a record of at most 2^14 bytes always seals";
        match &self.key {
            Key::AwsLc(k) => {
                let sealed =
                    k.seal_in_place_separate_tag(aws::Nonce::assume_unique_for_key(nonce), aws::Aad::from(header), inner).expect(SEALS);
                tag.copy_from_slice(sealed.as_ref());
            }
            Key::Ring(k) => {
                let sealed =
                    k.seal_in_place_separate_tag(rg::Nonce::assume_unique_for_key(nonce), rg::Aad::from(header), inner).expect(SEALS);
                tag.copy_from_slice(sealed.as_ref());
            }
        }
    }

    /// Seal `body` into `record` (`body.len() + OVERHEAD` bytes), reading it where it is: the
    /// cipher writes the record, with no copy of the plaintext first.
    pub(super) fn seal_from(&mut self, record: &mut [u8], body: &[u8], content_type: u8) {
        assert_eq!(record.len(), body.len() + OVERHEAD, "a record's room is its body and OVERHEAD");
        let header = self.header(record.len());
        let (head, rest) = record.split_at_mut(HEADER);
        head.copy_from_slice(&header);
        let nonce = self.next_nonce();
        const SEALS: &str = "a record of at most 2^14 bytes, sized by OVERHEAD, always seals";
        match &self.key {
            Key::AwsLc(k) => {
                let (sealed, type_and_tag) = rest.split_at_mut(body.len());
                let nonce = aws::Nonce::assume_unique_for_key(nonce);
                k.seal_out_of_place_scatter(nonce, aws::Aad::from(header), body, sealed, &[content_type], type_and_tag).expect(SEALS);
            }
            Key::Ring(k) => {
                let (inner, tag) = rest.split_at_mut(body.len() + 1);
                copy(&mut inner[..body.len()], body);
                inner[body.len()] = content_type;
                let sealed =
                    k.seal_in_place_separate_tag(rg::Nonce::assume_unique_for_key(nonce), rg::Aad::from(header), inner).expect(SEALS);
                tag.copy_from_slice(sealed.as_ref());
            }
        }
    }

    /// Append a whole record of `content_type` holding `body`.
    pub(super) fn seal_record(&mut self, out: &mut impl Records, content_type: u8, body: &[u8]) {
        self.seal_from(out.grow(body.len() + OVERHEAD), body, content_type);
    }

    /// The header of a record `len` bytes long, header included.
    fn header(&self, len: usize) -> [u8; HEADER] {
        debug_assert!((OVERHEAD..=HEADER + MAX_CIPHERTEXT).contains(&len), "a record of {len} bytes");
        let len = len - HEADER;
        [APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8]
    }

    /// Open the record `buf` holds whole (header included), in place. Returns its inner content
    /// type and where its plaintext is in `buf`.
    pub(super) fn open(&mut self, buf: &mut [u8]) -> Result<(u8, std::ops::Range<usize>), rustls::Error> {
        let header: [u8; HEADER] = buf[..HEADER].try_into().expect("a whole record");
        let nonce = self.next_nonce();
        let body = &mut buf[HEADER..];
        let plain = match &self.key {
            Key::AwsLc(k) => k.open_in_place(aws::Nonce::assume_unique_for_key(nonce), aws::Aad::from(header), body).map_err(|_| ()),
            Key::Ring(k) => k.open_in_place(rg::Nonce::assume_unique_for_key(nonce), rg::Aad::from(header), body).map_err(|_| ()),
        }
        .map_err(|()| rustls::Error::DecryptError)?;
        let (content_type, len) = inner_plaintext(plain)?;
        Ok((content_type, HEADER..HEADER + len))
    }

    /// Open the record `record` holds whole (header included) into `out`, which has room for its
    /// inner plaintext (`record.len() - HEADER - TAG` bytes). Returns its inner content type and
    /// how many bytes of content start `out`. A record that fails its tag leaves `out` holding
    /// bytes of no meaning.
    pub(super) fn open_into(&mut self, record: &[u8], out: &mut [u8]) -> Result<(u8, usize), rustls::Error> {
        let header: [u8; HEADER] = record[..HEADER].try_into().expect("a whole record");
        let (sealed, tag) = record[HEADER..].split_at(record.len() - HEADER - TAG);
        assert_eq!(out.len(), sealed.len(), "room for exactly the record's inner plaintext (opened_len)");
        let nonce = self.next_nonce();
        let opened = match &self.key {
            Key::AwsLc(k) => {
                k.open_separate_gather(aws::Nonce::assume_unique_for_key(nonce), aws::Aad::from(header), sealed, tag, out).map_err(|_| ())
            }
            Key::Ring(k) => {
                copy(out, sealed);
                let tag = rg::Tag::from(<[u8; TAG]>::try_from(tag).expect("TAG bytes"));
                k.open_in_place_separate_tag(rg::Nonce::assume_unique_for_key(nonce), rg::Aad::from(header), tag, out, 0..)
                    .map(drop)
                    .map_err(|_| ())
            }
        };
        opened.map_err(|()| rustls::Error::DecryptError)?;
        inner_plaintext(out)
    }
}

/// Copy `src` to `dst` (the same length) with 16-byte vector moves. A record's body sits 5 bytes
/// past its header, so the copies ring needs are between addresses whose offsets within a cache
/// line differ; for those, glibc's memcpy (2.36) uses `rep movsb` above 2 KiB, and on AMD Zen 3
/// that ran at 2.7 GiB/s against 88 for the same copy with both ends aligned alike (16 KiB in the
/// cache; docs/performance.md, session 30). Vector moves do not care how the two ends align.
/// They are intrinsics, four 16-byte lanes per 64 bytes, not `copy_from_slice` per chunk: LLVM
/// turns a loop of fixed-size copies back into one `memcpy` call.
fn copy(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "copy between slices of one length");
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_storeu_si128};
        const STEP: usize = 64;
        let whole = src.len() / STEP * STEP;
        for (d, s) in dst[..whole].chunks_exact_mut(STEP).zip(src[..whole].chunks_exact(STEP)) {
            // SAFETY: SSE2 is part of x86-64; each chunk is 64 bytes, read and written as four
            // unaligned 16-byte lanes within it.
            unsafe {
                let (s, d) = (s.as_ptr() as *const __m128i, d.as_mut_ptr() as *mut __m128i);
                let lanes = [_mm_loadu_si128(s), _mm_loadu_si128(s.add(1)), _mm_loadu_si128(s.add(2)), _mm_loadu_si128(s.add(3))];
                for (i, lane) in lanes.into_iter().enumerate() {
                    _mm_storeu_si128(d.add(i), lane);
                }
            }
        }
        // Under 64 bytes: memcpy moves that few with vector registers.
        dst[whole..].copy_from_slice(&src[whole..]);
    }
    #[cfg(not(target_arch = "x86_64"))]
    dst.copy_from_slice(src);
}

/// The room a record's inner plaintext takes once opened: the record less its header and tag.
pub(super) fn opened_len(record_len: usize) -> usize {
    record_len - HEADER - TAG
}

/// The content type of an opened record and how long its content is: the type is the last byte
/// that is not zero padding (RFC 8446 5.4).
fn inner_plaintext(plain: &[u8]) -> Result<(u8, usize), rustls::Error> {
    // Padding included, the inner plaintext is at most 2^14 + 1 bytes (RFC 8446 5.4).
    if plain.len() > MAX_FRAGMENT + 1 {
        return Err(rustls::Error::PeerSentOversizedRecord);
    }
    let end = plain.iter().rposition(|&b| b != 0).ok_or(rustls::Error::PeerMisbehaved(rustls::PeerMisbehaved::IllegalTlsInnerPlaintext))?;
    Ok((plain[end], end))
}

/// Where records are appended: grows by `n` bytes and hands them over to be written.
pub(super) trait Records {
    fn grow(&mut self, n: usize) -> &mut [u8];
}

impl Records for Vec<u8> {
    fn grow(&mut self, n: usize) -> &mut [u8] {
        let at = self.len();
        self.resize(at + n, 0);
        &mut self[at..]
    }
}

/// The length of the record at the start of `buf` (header included) once its header has arrived,
/// or None before; an error for bytes that are not a TLS 1.3 record.
pub(super) fn record_len(buf: &[u8]) -> Result<Option<usize>, rustls::Error> {
    if buf.len() < HEADER {
        return Ok(None);
    }
    if buf[0] != APPLICATION_DATA || buf[1] != 3 || buf[2] != 3 {
        return Err(rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType));
    }
    let len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if len > MAX_CIPHERTEXT {
        return Err(rustls::Error::PeerSentOversizedRecord);
    }
    if len < TAG + 1 {
        return Err(rustls::Error::DecryptError);
    }
    Ok(Some(HEADER + len))
}
