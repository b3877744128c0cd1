use super::*;

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
