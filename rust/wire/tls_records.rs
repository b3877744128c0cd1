//! TLS 1.3 record protection (RFC 8446, section 5) for the stream `tls` runs once rustls has
//! finished the handshake: rustls keeps the secrets and derives each new key
//! (`KernelConnection`), the records themselves are sealed and opened here, in buffers the
//! caller owns. That is what lets a send encrypt guest memory straight into one large write
//! buffer and a receive decrypt records where they arrived and copy them once into guest memory.
//! rustls' own record layer allocates a buffer per record on both sides and copies each one more
//! time (docs/performance.md, "TLS in the core").

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use rustls::ConnectionTrafficSecrets;

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

/// One direction's record key: the AEAD key and IV rustls derived and the record sequence number.
pub(super) struct RecordKey {
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    pub(super) seq: u64,
}

impl RecordKey {
    /// From the secrets rustls hands over (`ExtractedSecrets`, `KernelConnection::update_*`).
    pub(super) fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> Result<RecordKey, rustls::Error> {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (&aead::CHACHA20_POLY1305, key, iv),
            _ => return Err(rustls::Error::General("no record layer for the negotiated cipher suite".into())),
        };
        let key = UnboundKey::new(alg, key.as_ref()).map_err(|_| rustls::Error::General("bad traffic key length".into()))?;
        let iv: [u8; NONCE_LEN] = iv.as_ref().try_into().map_err(|_| rustls::Error::General("bad traffic IV length".into()))?;
        Ok(RecordKey { key: LessSafeKey::new(key), iv, seq })
    }

    /// The per-record nonce: the IV XOR the sequence number (RFC 8446 5.3); the number advances.
    fn next_nonce(&mut self) -> Nonce {
        let mut nonce = self.iv;
        for (n, s) in nonce[NONCE_LEN - 8..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq += 1;
        Nonce::assume_unique_for_key(nonce)
    }

    /// Seal the record that starts at `out[start]`: `HEADER` bytes reserved there, then its
    /// plaintext up to the end of `out`. Appends the inner content type and the tag.
    pub(super) fn seal(&mut self, out: &mut Vec<u8>, start: usize, content_type: u8) {
        out.push(content_type);
        let len = out.len() - start - HEADER + TAG;
        let header = [APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8];
        out[start..start + HEADER].copy_from_slice(&header);
        let nonce = self.next_nonce();
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), &mut out[start + HEADER..])
            .expect("a record of at most 2^14 bytes always seals");
        out.extend_from_slice(tag.as_ref());
    }

    /// Append a whole record of `content_type` holding `body`.
    pub(super) fn seal_record(&mut self, out: &mut Vec<u8>, content_type: u8, body: &[u8]) {
        let start = out.len();
        out.extend_from_slice(&[0; HEADER]);
        out.extend_from_slice(body);
        self.seal(out, start, content_type);
    }

    /// Open the record `buf` holds whole (header included), in place. Returns its inner content
    /// type and where its plaintext is in `buf`.
    pub(super) fn open(&mut self, buf: &mut [u8]) -> Result<(u8, std::ops::Range<usize>), rustls::Error> {
        let header: [u8; HEADER] = buf[..HEADER].try_into().expect("a whole record");
        let nonce = self.next_nonce();
        let plain = self.key.open_in_place(nonce, Aad::from(header), &mut buf[HEADER..]).map_err(|_| rustls::Error::DecryptError)?;
        // The content type is the last byte that is not zero padding (RFC 8446 5.4).
        let end =
            plain.iter().rposition(|&b| b != 0).ok_or(rustls::Error::PeerMisbehaved(rustls::PeerMisbehaved::IllegalTlsInnerPlaintext))?;
        if end > MAX_FRAGMENT {
            return Err(rustls::Error::PeerSentOversizedRecord);
        }
        Ok((plain[end], HEADER..HEADER + end))
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
