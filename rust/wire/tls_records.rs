//! TLS 1.3 record protection (RFC 8446, section 5) for the stream `tls` runs once rustls has
//! finished the handshake: rustls keeps the secrets and derives each new key
//! (`KernelConnection`), the records themselves are sealed and opened here, in buffers the
//! caller owns. That is what lets a send encrypt guest memory straight into one large write
//! buffer, and a receive decrypt a record straight into the reader's buffer (or where it arrived,
//! when it does not fit there).
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

    /// Seal the record `record` holds: `HEADER` bytes reserved, its plaintext, then room for the
    /// inner content type and the tag (`OVERHEAD` bytes in all beside the plaintext).
    pub(super) fn seal(&mut self, record: &mut [u8], content_type: u8) {
        let header = self.header(record.len());
        let (head, body) = record.split_at_mut(HEADER);
        head.copy_from_slice(&header);
        let (inner, tag) = body.split_at_mut(body.len() - TAG);
        inner[inner.len() - 1] = content_type;
        let nonce = self.next_nonce();
        let sealed =
            self.key.seal_in_place_separate_tag(nonce, Aad::from(header), inner).expect("a record of at most 2^14 bytes always seals");
        tag.copy_from_slice(sealed.as_ref());
    }

    /// Seal `body` into `record` (`body.len() + OVERHEAD` bytes), reading it where it is: the
    /// cipher writes the record, with no copy of the plaintext first.
    pub(super) fn seal_from(&mut self, record: &mut [u8], body: &[u8], content_type: u8) {
        assert_eq!(record.len(), body.len() + OVERHEAD, "a record's room is its body and OVERHEAD");
        let header = self.header(record.len());
        let (head, rest) = record.split_at_mut(HEADER);
        head.copy_from_slice(&header);
        let (sealed, type_and_tag) = rest.split_at_mut(body.len());
        let nonce = self.next_nonce();
        self.key
            .seal_out_of_place_scatter(nonce, Aad::from(header), body, sealed, &[content_type], type_and_tag)
            .expect("a record of at most 2^14 bytes, sized by OVERHEAD, always seals");
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
        let plain = self.key.open_in_place(nonce, Aad::from(header), &mut buf[HEADER..]).map_err(|_| rustls::Error::DecryptError)?;
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
        let nonce = self.next_nonce();
        self.key.open_separate_gather(nonce, Aad::from(header), sealed, tag, out).map_err(|_| rustls::Error::DecryptError)?;
        inner_plaintext(out)
    }
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
