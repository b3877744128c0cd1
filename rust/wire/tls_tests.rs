use super::super::tls_records::{self, Aead, Backend};
use super::*;
use std::io::{Read, Write};

#[test]
fn alert_names_read_as_words() {
    assert_eq!(spaced("CertificateRequired"), "certificate required");
    assert_eq!(spaced("UnknownCA"), "unknown ca");
    assert_eq!(describe(&rustls::Error::AlertReceived(AlertDescription::CertificateExpired)), "alert certificate expired");
}

#[test]
fn unusable_pem_names_the_part() {
    let ca_missing = TlsIdentity::from_pem(None, None, b"not pem").err().unwrap();
    assert_eq!(ca_missing.part, "ca");
    let cert_missing = TlsIdentity::from_pem(Some(b"nothing here"), None, b"").err().unwrap();
    assert_eq!(cert_missing.part, "certificate");
}

#[test]
fn handshake_failures_are_sorted_by_what_the_user_must_fix() {
    let untrusted = HandshakeFailure::Tls { error: rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer), received: vec![] };
    assert_eq!(untrusted.kind(), "untrusted");
    let refused = HandshakeFailure::Tls { error: rustls::Error::AlertReceived(AlertDescription::UnknownCA), received: vec![] };
    assert_eq!(refused.kind(), "refused");
    assert_eq!(HandshakeFailure::Closed { received: b"VMMP".to_vec() }.received(), b"VMMP");
    assert_eq!(stream_failure(&rustls::Error::DecryptError), "TLS: bad record mac: the stream was altered on the way");
}

// -- the record layer over a real connection ------------------------------------------------------

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

/// PEM fixtures made once with trustme (valid until the year 3000): a CA, a server certificate for
/// "localhost" and a client certificate, both signed by it.
const CA: &[u8] = include_bytes!("../../tests/fixtures/tls/ca.pem");
const SERVER: (&[u8], &[u8]) =
    (include_bytes!("../../tests/fixtures/tls/server.pem"), include_bytes!("../../tests/fixtures/tls/server.key"));
const CLIENT: (&[u8], &[u8]) =
    (include_bytes!("../../tests/fixtures/tls/client.pem"), include_bytes!("../../tests/fixtures/tls/client.key"));

/// (client, server) after a mutual TLS handshake over the connected sockets `client_fd` and `server_fd`.
fn handshake(client_fd: RawFd, server_fd: RawFd) -> (TlsStream, TlsStream) {
    let server = std::thread::spawn(move || {
        let config = TlsIdentity::from_pem(Some(SERVER.0), Some(SERVER.1), CA).unwrap().server_config().unwrap();
        TlsStream::handshake(server_fd, Side::Server { config }, Duration::from_secs(20)).unwrap()
    });
    let config = TlsIdentity::from_pem(Some(CLIENT.0), Some(CLIENT.1), CA).unwrap().client_config().unwrap();
    let client =
        TlsStream::handshake(client_fd, Side::Client { config, server_name: "localhost".into() }, Duration::from_secs(20)).unwrap();
    (client, server.join().unwrap())
}

/// (client, server, the sockets they run on) after a mutual TLS handshake over a socketpair.
pub(in crate::wire) fn pair() -> (TlsStream, TlsStream, UnixStream, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    for s in [&a, &b] {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    }
    let (client, server) = handshake(a.as_raw_fd(), b.as_raw_fd());
    (client, server, a, b)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8).collect()
}

/// Send `data` from `from` in uneven parts while `to` reads it; what arrived.
fn cross(from: &TlsStream, to: &TlsStream, data: &[u8]) -> Vec<u8> {
    std::thread::scope(|s| {
        s.spawn(|| {
            for piece in data.chunks(100_003) {
                let (head, tail) = piece.split_at(piece.len() / 3);
                from.send_parts(&[head, tail], "sending").unwrap();
            }
        });
        let mut got = vec![0u8; data.len()];
        let mut at = 0;
        while at < got.len() {
            let n = to.recv(&mut got[at..], Wait::Timeout, false).unwrap();
            assert!(n > 0, "the stream ended after {at} bytes");
            at += n;
        }
        got
    })
}

#[test]
fn bytes_cross_exactly_in_full_records_both_ways() {
    let (client, server, _a, _b) = pair();
    assert!(client.summary().contains("TLS13_AES_128_GCM_SHA256"), "{}", client.summary());
    assert_eq!(server.peer_names(), "client.test");
    let data = pattern(3 << 20, 7);
    assert!(cross(&client, &server, &data) == data);
    // Records are filled across the parts of a send: one record per 2^14 bytes of each send, not
    // one more per part.
    let records: usize = data.chunks(100_003).map(|piece| piece.len().div_ceil(MAX_FRAGMENT)).sum();
    assert_eq!(lock(&client.outbox).key.seq, records as u64);
    let back = pattern(1 << 20, 99);
    assert!(cross(&server, &client, &back) == back);
    client.close_notify();
    let mut buf = [0u8; 16];
    assert_eq!(server.recv(&mut buf, Wait::Timeout, false).unwrap(), 0);
    assert_eq!(server.failure(), None, "close_notify is a clean end");
    assert_eq!(server.pending(), 1, "a read would return the end at once");
}

#[test]
fn keys_are_updated_before_their_record_limit_and_the_bytes_stay_exact() {
    let (client, server, _a, _b) = pair();
    for end in [&client, &server] {
        lock(&end.outbox).records_per_key = 4; // AES-GCM's real limit is 2^24 records
    }
    let data = pattern(1 << 20, 3);
    assert!(cross(&client, &server, &data) == data);
    let back = pattern(1 << 20, 5);
    assert!(cross(&server, &client, &back) == back);
    for end in [&client, &server] {
        // 64 records each way: without key updates the sequence numbers would pass 64.
        assert!(lock(&end.outbox).key.seq < 4);
        assert!(lock(&end.inbox).key.seq < 4);
    }
}

#[test]
fn a_key_update_that_asks_for_one_back_is_answered() {
    let (client, server, _a, _b) = pair();
    {
        // The client sends a KeyUpdate with update_requested, as another TLS stack might.
        let mut outbox = lock(&client.outbox);
        let Outbox { out, key, .. } = &mut *outbox;
        key.seal_record(out, HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 1]);
        *key = lock(&client.kernel).next_key(false).unwrap();
        let mut deadline = SendDeadline::new(client.fd);
        client.flush(&mut outbox, &mut deadline, "sending").unwrap();
    }
    assert!(cross(&client, &server, b"after the update") == b"after the update");
    assert!(server.update_wanted.load(Ordering::Acquire), "the server owes a KeyUpdate");
    assert!(cross(&server, &client, b"answered") == b"answered");
    assert!(!server.update_wanted.load(Ordering::Acquire));
    // Its ticket and "answered" would be records 0 and 1 of one key: "answered" is record 0 of the new one.
    assert_eq!(lock(&server.outbox).key.seq, 1, "the server's send key changed");
}

#[test]
fn an_altered_record_is_named_and_every_later_read_says_so() {
    // Read into room for the record (opened there) and into less (opened where it arrived).
    for room in [64, 8] {
        let (client, server, a, _b) = pair();
        let mut outbox = lock(&client.outbox);
        let mut record = Vec::new();
        outbox.key.seal_record(&mut record, APPLICATION_DATA, b"a record that will not survive");
        record[10] ^= 1;
        (&a).write_all(&record).unwrap();
        drop(outbox);
        let mut buf = vec![0u8; room];
        for _ in 0..2 {
            match server.recv(&mut buf, Wait::Timeout, false) {
                Err(RecvError::Tls(why)) => assert_eq!(why, "TLS: bad record mac: the stream was altered on the way"),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(server.pending(), 1, "a read would report the failure at once");
        // The client is told why.
        match client.recv(&mut buf, Wait::Timeout, false) {
            Err(RecvError::Tls(why)) => assert_eq!(why, "TLS: alert bad record mac"),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn reads_of_any_size_take_the_bytes_exactly() {
    // Reads smaller than a record, of one record, of one byte more, and of many: records are
    // opened straight into the reader's buffer where they fit and copied out where they do not.
    let (client, server, _a, _b) = pair();
    let data = pattern(2 << 20, 11);
    let sizes = [1, 700, MAX_FRAGMENT - 1, MAX_FRAGMENT, MAX_FRAGMENT + 1, 3 * MAX_FRAGMENT + 5, 200_000];
    let got = std::thread::scope(|s| {
        s.spawn(|| {
            for piece in data.chunks(100_003) {
                let (head, tail) = piece.split_at(piece.len() / 3);
                client.send_parts(&[head, tail], "sending").unwrap();
            }
        });
        let mut got = vec![0u8; data.len()];
        let (mut at, mut i) = (0, 0);
        while at < got.len() {
            let end = (at + sizes[i % sizes.len()]).min(got.len());
            let n = server.recv(&mut got[at..end], Wait::Timeout, false).unwrap();
            assert!(n > 0, "the stream ended after {at} bytes");
            at += n;
            i += 1;
        }
        got
    });
    assert!(got == data);
    // Both ways of sealing and of opening ran.
    let [from_parts, copied_in] = lock(&client.outbox).sealed;
    let [into_reader, in_inbox] = lock(&server.inbox).opened;
    assert!(from_parts > 0 && copied_in > 0, "sealed from the parts {from_parts}, copied in {copied_in}");
    assert!(into_reader > 0 && in_inbox > 0, "opened into the reader's buffer {into_reader}, in the inbox {in_inbox}");
}

#[test]
fn empty_and_padded_records_read_as_their_content_wherever_they_are_opened() {
    // Records as another stack may send them: an empty one, then "hello" padded with 100 zeros
    // (RFC 8446 5.4). Read with room for its content only (opened where it arrived, copied out)
    // and with room for all of it (opened into the reader's buffer).
    for room in [8, 200] {
        let (client, server, a, _b) = pair();
        let mut records = Vec::new();
        {
            let mut outbox = lock(&client.outbox);
            outbox.key.seal_record(&mut records, APPLICATION_DATA, b"");
            let mut padded = b"hello".to_vec();
            padded.push(APPLICATION_DATA);
            padded.resize(5 + 1 + 100, 0);
            // Sealed with content type 0: the zero is padding, the type is the last byte not zero.
            outbox.key.seal_record(&mut records, 0, &padded);
            outbox.key.seal_record(&mut records, APPLICATION_DATA, b" world");
        }
        (&a).write_all(&records).unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; room];
        while got.len() < 11 {
            let n = server.recv(&mut buf, Wait::Timeout, false).unwrap();
            assert!(n > 0, "the stream ended early");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"hello world", "room {room}");
        // In 8 bytes: the empty record fits; the padded one does not; " world" (7 bytes with its
        // type) does not fit in the 3 left after "hello".
        let [into_reader, in_inbox] = lock(&server.inbox).opened;
        assert_eq!((into_reader, in_inbox), if room == 8 { (1, 2) } else { (3, 0) }, "room {room}");
    }
}

#[test]
fn a_record_longer_than_tls_allows_with_its_padding_is_refused() {
    let (mut seal, _) = twin_keys();
    let body = vec![0u8; MAX_FRAGMENT + 1]; // with the type byte: 2^14 + 2 bytes of inner plaintext
    let mut record = vec![0u8; body.len() + OVERHEAD];
    seal.seal_from(&mut record, &body, APPLICATION_DATA);
    let (mut open, mut open_into) = twin_keys();
    assert_eq!(open.open(&mut record.clone()).unwrap_err(), rustls::Error::PeerSentOversizedRecord);
    let mut out = vec![0u8; tls_records::opened_len(record.len())];
    assert_eq!(open_into.open_into(&record, &mut out).unwrap_err(), rustls::Error::PeerSentOversizedRecord);
}

/// Two keys alike: the same secrets, the same sequence number.
fn twin_keys() -> (RecordKey, RecordKey) {
    let secrets = || rustls::ConnectionTrafficSecrets::Aes256Gcm {
        key: rustls::crypto::cipher::AeadKey::from([7u8; 32]),
        iv: rustls::crypto::cipher::Iv::from([9u8; 12]),
    };
    (RecordKey::new(5, secrets()).unwrap(), RecordKey::new(5, secrets()).unwrap())
}

#[test]
fn a_record_sealed_from_where_its_bytes_are_is_the_record_sealed_in_place() {
    let body = pattern(MAX_FRAGMENT, 3);
    let (mut a, mut b) = twin_keys();
    let mut in_place = vec![0u8; body.len() + OVERHEAD];
    in_place[HEADER..HEADER + body.len()].copy_from_slice(&body);
    a.seal(&mut in_place, APPLICATION_DATA);
    let mut from = vec![0u8; body.len() + OVERHEAD];
    b.seal_from(&mut from, &body, APPLICATION_DATA);
    assert!(in_place == from);
    assert_eq!(tls_records::record_len(&from).unwrap(), Some(from.len()));
    // Both ways of opening give the body back.
    let (mut a, mut b) = twin_keys();
    let (kind, range) = a.open(&mut in_place).unwrap();
    assert_eq!(kind, APPLICATION_DATA);
    assert!(in_place[range] == body[..]);
    let mut out = vec![0u8; tls_records::opened_len(from.len())];
    assert_eq!(b.open_into(&from, &mut out).unwrap(), (APPLICATION_DATA, body.len()));
    assert!(out[..body.len()] == body[..]);
}

const BACKENDS: [Backend; 2] = [Backend::AwsLc, Backend::Ring];
const AEADS: [Aead; 3] = [Aead::Aes128Gcm, Aead::Aes256Gcm, Aead::Chacha20Poly1305];

fn key_of(backend: Backend, aead: Aead) -> RecordKey {
    let secret = [7u8; 32];
    let len = if aead == Aead::Aes128Gcm { 16 } else { 32 };
    RecordKey::with(backend, aead, &secret[..len], [9u8; 12], 5).unwrap()
}

#[test]
fn either_library_opens_what_the_other_sealed_and_both_seal_the_same_bytes() {
    // The ends choose their library each for itself: the records must be the same bytes.
    for aead in AEADS {
        for len in [0, 1, 4095, MAX_FRAGMENT] {
            let body = pattern(len, len as u8);
            let records: Vec<Vec<u8>> = BACKENDS
                .iter()
                .flat_map(|&b| {
                    let mut in_place = vec![0u8; len + OVERHEAD];
                    in_place[HEADER..HEADER + len].copy_from_slice(&body);
                    key_of(b, aead).seal(&mut in_place, APPLICATION_DATA);
                    let mut from = vec![0u8; len + OVERHEAD];
                    key_of(b, aead).seal_from(&mut from, &body, APPLICATION_DATA);
                    [in_place, from]
                })
                .collect();
            assert!(records.iter().all(|r| *r == records[0]), "{aead:?} {len}: the libraries sealed different records");
            for b in BACKENDS {
                let mut record = records[0].clone();
                let (kind, range) = key_of(b, aead).open(&mut record).unwrap();
                assert_eq!(kind, APPLICATION_DATA);
                assert!(record[range] == body[..], "{aead:?} {len} {b:?}: open");
                let mut out = vec![0xeeu8; tls_records::opened_len(records[0].len())];
                assert_eq!(key_of(b, aead).open_into(&records[0], &mut out).unwrap(), (APPLICATION_DATA, len));
                assert!(out[..len] == body[..], "{aead:?} {len} {b:?}: open_into");

                for at in [4, HEADER, records[0].len() - 1] {
                    let mut bad = records[0].clone();
                    bad[at] ^= 4;
                    assert_eq!(key_of(b, aead).open(&mut bad.clone()).unwrap_err(), rustls::Error::DecryptError, "{aead:?} {b:?} @{at}");
                    let mut out = vec![0u8; tls_records::opened_len(bad.len())];
                    assert_eq!(key_of(b, aead).open_into(&bad, &mut out).unwrap_err(), rustls::Error::DecryptError);
                }
            }
        }
    }
}

#[test]
fn each_process_keeps_the_library_it_timed_faster() {
    for aead in AEADS {
        let choice = Backend::chosen(aead);
        assert!(choice.aws_lc_gib_s > 0.0 && choice.ring_gib_s > 0.0, "{choice:?}");
        let faster = if choice.ring_gib_s > choice.aws_lc_gib_s { Backend::Ring } else { Backend::AwsLc };
        assert_eq!(choice.backend, faster, "{aead:?}: {choice:?}");
        // Once chosen, the choice stays for the process: both ends of a stream use one library.
        assert_eq!(Backend::chosen(aead).backend, choice.backend);
        let key = RecordKey::with(choice.backend, aead, &[1u8; 32][..if aead == Aead::Aes128Gcm { 16 } else { 32 }], [0; 12], 0).unwrap();
        let said = key.describe();
        assert!(said.starts_with(choice.backend.name()) && said.contains("GiB/s a core here"), "{said}");
    }
}

#[test]
fn padded_records_of_another_stack_open_to_their_content() {
    // RFC 8446 5.4: content, its type, then zeros. Sealed here as a body whose last byte is 0.
    let (mut seal, _) = twin_keys();
    let mut padded = vec![0u8; 11 + OVERHEAD];
    seal.seal_from(&mut padded, b"hello\x17\0\0\0\0\0", 0);
    let mut only_zeros = vec![0u8; 2 + OVERHEAD];
    seal.seal_from(&mut only_zeros, &[0, 0], 0);
    let (mut open, mut open_into) = twin_keys();
    let (kind, range) = open.open(&mut padded.clone()).unwrap();
    assert_eq!((kind, range.len()), (APPLICATION_DATA, 5));
    let mut out = [0xffu8; 12];
    assert_eq!(open_into.open_into(&padded, &mut out).unwrap(), (APPLICATION_DATA, 5));
    assert_eq!(&out[..5], b"hello");
    let illegal = rustls::Error::PeerMisbehaved(rustls::PeerMisbehaved::IllegalTlsInnerPlaintext);
    assert_eq!(open.open(&mut only_zeros.clone()).unwrap_err(), illegal);
    assert_eq!(open_into.open_into(&only_zeros, &mut out[..3]).unwrap_err(), illegal);
}

#[test]
fn what_is_not_a_record_is_refused() {
    assert!(tls_records::record_len(b"GET / HTTP/1.1").is_err());
    assert!(matches!(tls_records::record_len(&[23, 3, 3, 0x48, 0x01]), Err(rustls::Error::PeerSentOversizedRecord)));
    assert_eq!(tls_records::record_len(&[23, 3, 3, 0x40, 0x11]).unwrap(), Some(HEADER + 0x4011));
    assert_eq!(tls_records::record_len(&[23, 3]).unwrap(), None);
}

#[test]
fn a_send_with_more_to_follow_waits_for_it_and_shares_its_records() {
    let (client, server, _a, _b) = pair();
    let first = client_seq(&client);
    client.send_parts_more(&[b"window one, "], "sending", true).unwrap();
    let mut buf = [0u8; 64];
    match server.recv(&mut buf, Wait::Never, false) {
        Err(RecvError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
        other => panic!("nothing should have been written yet: {other:?}"),
    }
    client.send_parts_more(&[b"window two"], "sending", false).unwrap();
    let mut got = Vec::new();
    while got.len() < 22 {
        let n = server.recv(&mut buf, Wait::Timeout, false).unwrap();
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got, b"window one, window two");
    assert_eq!(client_seq(&client), first + 1, "both windows in one record");
}

fn client_seq(end: &TlsStream) -> u64 {
    lock(&end.outbox).key.seq
}

// -- page windows read whole (SO_RCVLOWAT) over TCP --------------------------------------------------

use super::super::stall::WholeReads;
use std::net::{TcpListener, TcpStream};

/// (client, server, the sockets they run on) after a mutual TLS handshake over loopback TCP, the
/// server's receive timeout `timeout` (a Unix socket's poll ignores the low-water mark).
fn tcp_pair(timeout: Duration) -> (TlsStream, TlsStream, TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (b, _) = listener.accept().unwrap();
    a.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    b.set_read_timeout(Some(timeout)).unwrap();
    let (client, server) = handshake(a.as_raw_fd(), b.as_raw_fd());
    (client, server, a, b)
}

/// Read `want` bytes as a page window is read (`recv_iovecs`, with the low-water mark when
/// `whole`); the bytes, or the error, and the reads of the socket that brought bytes.
fn read_window(server: &TlsStream, want: usize, whole: bool) -> (Result<Vec<u8>, PageError>, u64) {
    let before = lock(&server.inbox).reads;
    let mut got = vec![0u8; want];
    let iov = [libc::iovec { iov_base: got.as_mut_ptr().cast(), iov_len: want }];
    let mut marks = if whole { WholeReads::new(server.fd(), want) } else { None };
    assert_eq!(marks.is_some(), whole, "a TLS link's socket reads whole windows");
    // SAFETY: the iovec is `got`, which nothing else references during the call.
    let read = unsafe { server.recv_iovecs(&iov, "receiving page data", marks.as_mut()) };
    drop(marks); // the mark goes back to 1 for the frames after a window
    let reads = lock(&server.inbox).reads - before;
    (read.map(|n| got[..n as usize].to_vec()), reads)
}

fn rcvlowat(fd: RawFd) -> libc::c_int {
    let mut lowat: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into the c_int we own.
    assert_eq!(unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, (&mut lowat as *mut libc::c_int).cast(), &mut len) }, 0);
    lowat
}

#[test]
fn over_tcp_a_tls_window_is_read_once_it_is_all_there_and_the_frames_after_it_byte_by_byte() {
    // The window comes in 8 sends 40 ms apart, then a one-byte frame. Read whole, the reader
    // sleeps until the last send's records are queued; read as it comes (the control), it wakes
    // for each send.
    let (client, server, _a, b) = tcp_pair(Duration::from_secs(20));
    let window = pattern(1 << 20, 11);
    for whole in [true, false] {
        let (got, reads) = std::thread::scope(|s| {
            s.spawn(|| {
                for part in window.chunks(window.len() / 8) {
                    client.send_parts(&[part], "sending").unwrap();
                    std::thread::sleep(Duration::from_millis(40));
                }
                client.send_parts(&[b"!"], "sending").unwrap();
            });
            let (got, reads) = read_window(&server, window.len(), whole);
            assert_eq!(rcvlowat(b.as_raw_fd()), 1, "the frames after a window are read as they come");
            let mut one = [0u8; 1];
            assert_eq!(server.recv(&mut one, Wait::Timeout, false).unwrap(), 1);
            assert_eq!(&one, b"!");
            (got.unwrap(), reads)
        });
        assert!(got == window, "whole: {whole}");
        if whole {
            assert!(reads <= 2, "read whole, the window took {reads} reads");
        } else {
            assert!(reads >= 4, "the control: read as it came, the window took only {reads} reads");
        }
    }
}

#[test]
fn what_a_tls_reader_waits_for_is_never_more_than_the_ciphertext_sent() {
    // The ciphertext of every send, read raw off the socket: at least the least_ciphertext of
    // its bytes, and exactly that for full records (a mark one byte higher would wait there for
    // bytes that never come).
    let (client, _server, _a, b) = pair();
    b.set_nonblocking(true).unwrap();
    let data = pattern(5 * MAX_FRAGMENT + 321, 4);
    let sends: [(Vec<&[u8]>, bool); 5] = [
        (vec![&data[..4 * MAX_FRAGMENT]], true),
        (data[..MAX_FRAGMENT * 3].chunks(MAX_FRAGMENT).collect(), true),
        (vec![&data[..]], false),
        (data[..40_000].chunks(997).collect(), false),
        (vec![&data[..1]], false),
    ];
    for (parts, full) in sends {
        let plain: usize = parts.iter().map(|p| p.len()).sum();
        for part in &parts {
            client.send_parts(&[part], "sending").unwrap();
        }
        let mut raw = 0;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match (&b).read(&mut buf) {
                Ok(n) => raw += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(raw >= least_ciphertext(plain), "{plain} bytes in {} sends: {raw} bytes of ciphertext", parts.len());
        if full {
            assert_eq!(raw, least_ciphertext(plain), "{plain} bytes in full records");
        }
    }
}

#[test]
fn a_tls_reader_finishes_a_window_when_nothing_follows_it() {
    // Exactly the window is sent, and then nothing until the reader answers: the window's last
    // sleep must end on what did come. Full records, records of a few bytes, and a window whose
    // first bytes were read as a frame from the middle of a record.
    let (client, server, _a, _b) = tcp_pair(Duration::from_secs(10));
    let window = pattern(64 * MAX_FRAGMENT, 5);
    let sends: [Vec<&[u8]>; 3] = [vec![&window[..]], window[..40_000].chunks(997).collect(), vec![&window[..3 * MAX_FRAGMENT + 10]]];
    for (i, parts) in sends.iter().enumerate() {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(50)); // the reader is asleep on its mark by then
                for part in parts {
                    client.send_parts(&[part], "sending").unwrap();
                }
                let mut answer = [0u8; 2];
                assert_eq!(client.recv(&mut answer, Wait::Timeout, false).unwrap(), 2);
            });
            let skip = if i == 2 { 100 } else { 0 };
            let mut head = vec![0u8; skip];
            let mut at = 0;
            while at < skip {
                at += server.recv(&mut head[at..], Wait::Timeout, false).unwrap();
            }
            assert!(head == window[..skip]);
            let (got, _) = read_window(&server, total - skip, true);
            let got = got.unwrap_or_else(|e| panic!("send set {i}: {e}"));
            assert!(got == window[skip..total], "send set {i}");
            server.send_parts(&[b"ok"], "answering").unwrap();
        });
    }
}

#[test]
fn a_tls_window_trickling_in_below_its_mark_is_not_a_timeout_and_a_stopped_one_is() {
    let (client, server, _a, _b) = tcp_pair(Duration::from_millis(600));
    let window = pattern(16 * MAX_FRAGMENT, 9);
    // Half at once, then a record every 200 ms (1.6 s in all, longer than the timeout): the
    // peer is sending, so the read waits on.
    let got = std::thread::scope(|s| {
        s.spawn(|| {
            let (head, tail) = window.split_at(8 * MAX_FRAGMENT);
            client.send_parts(&[head], "sending").unwrap();
            for record in tail.chunks(MAX_FRAGMENT) {
                std::thread::sleep(Duration::from_millis(200));
                client.send_parts(&[record], "sending").unwrap();
            }
        });
        read_window(&server, window.len(), true).0
    });
    assert!(got.unwrap() == window);
    // Half, and then nothing: the read gives up one timeout after the last byte arrived.
    let (got, _) = std::thread::scope(|s| {
        s.spawn(|| client.send_parts(&[&window[..8 * MAX_FRAGMENT]], "sending").unwrap());
        read_window(&server, window.len(), true)
    });
    assert!(matches!(got, Err(PageError::TimedOut { .. })), "{got:?}");
}

#[test]
fn signals_during_a_tls_window_do_not_put_off_its_timeout() {
    // A peer that stopped half-way through a window, and a signal at the reader every 100 ms
    // (without SA_RESTART, as a profiler's or an embedder's timer would be): the read still gives
    // up about one timeout (600 ms) after the last byte, while the signals go on for up to 5 s.
    extern "C" fn ignore(_: libc::c_int) {}
    // SAFETY: a handler that does nothing, installed for a signal nothing else in the tests uses.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = ignore as *const () as usize;
        libc::sigaction(libc::SIGUSR2, &action, std::ptr::null_mut());
    }
    let (client, server, _a, _b) = tcp_pair(Duration::from_millis(600));
    let window = pattern(16 * MAX_FRAGMENT, 2);
    client.send_parts(&[&window[..8 * MAX_FRAGMENT]], "sending").unwrap();
    let done = AtomicBool::new(false);
    let (tx, rx) = std::sync::mpsc::channel();
    let (got, signalled) = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            // SAFETY: pthread_self has no preconditions.
            tx.send(unsafe { libc::pthread_self() } as usize).unwrap();
            let got = read_window(&server, window.len(), true).0;
            done.store(true, Ordering::SeqCst);
            got
        });
        let thread = rx.recv().unwrap() as libc::pthread_t;
        let mut signalled = 0;
        while !done.load(Ordering::SeqCst) && signalled < 50 {
            std::thread::sleep(Duration::from_millis(100));
            if !done.load(Ordering::SeqCst) {
                // SAFETY: the reader thread is alive until `done`, and SIGUSR2 has a handler.
                unsafe { libc::pthread_kill(thread, libc::SIGUSR2) };
                signalled += 1;
            }
        }
        (reader.join().unwrap(), signalled)
    });
    assert!(matches!(got, Err(PageError::TimedOut { .. })), "{got:?}");
    assert!(signalled < 50, "the read ended only once the signals stopped ({signalled} sent)");
}

#[test]
fn an_alert_in_the_middle_of_a_tls_window_is_read_without_waiting_for_the_mark() {
    // A peer ends (close_notify) or fails (a fatal alert) a quarter of the way through a window
    // and leaves its socket open: the alert, far shorter than the mark, is read and reported
    // within a quarter of the timeout, not taken for a silence.
    for fatal in [false, true] {
        let (client, server, _a, _b) = tcp_pair(Duration::from_secs(4));
        let window = pattern(16 * MAX_FRAGMENT, 6);
        client.send_parts(&[&window[..4 * MAX_FRAGMENT]], "sending").unwrap();
        if fatal {
            let mut outbox = lock(&client.outbox);
            let mut alert = Vec::new();
            outbox.key.seal_record(&mut alert, ALERT, &[2, 80]); // internal_error
            send_some(client.fd(), &alert).unwrap();
        } else {
            client.close_notify();
        }
        let (got, _) = read_window(&server, window.len(), true);
        match got {
            Ok(bytes) if !fatal => assert!(bytes == window[..4 * MAX_FRAGMENT], "the bytes before close_notify"),
            Err(PageError::Io { what, .. }) if fatal => assert!(what.contains("alert internal error"), "{what}"),
            other => panic!("fatal: {fatal}: {other:?}"),
        }
    }
}
