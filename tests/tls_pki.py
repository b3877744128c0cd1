"""Throwaway certificate authorities and certificates for the TLS tests, made with trustme and
written as PEM files under the test's tmp_path (nothing is committed; every run makes new keys)."""

from __future__ import annotations

import datetime
from pathlib import Path

import trustme

from vmmpy import _core
from vmmpy.migration.tls import TlsConfig


class Pki:
    """A CA (``ca``), a second unrelated one (``other_ca``), and certificates on demand."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA(organization_name="vmmpy test migration CA")
        self.other_ca = trustme.CA(organization_name="vmmpy test unrelated CA")
        self.ca_file = self._write("ca.pem", self.ca.cert_pem.bytes())
        self.other_ca_file = self._write("other-ca.pem", self.other_ca.cert_pem.bytes())

    def _write(self, name: str, data: bytes) -> str:
        path = self.dir / name
        path.write_bytes(data)
        path.chmod(0o600)
        return str(path)

    def files(self, name: str, *identities: str, ca: trustme.CA | None = None, expired: bool = False) -> tuple[str, str]:
        """(certificate file, key file) for ``identities`` (IP addresses or DNS names);
        ``expired``: valid for one day that ended yesterday."""
        validity = {}
        if expired:
            now = datetime.datetime.now(datetime.UTC)
            validity = {"not_before": now - datetime.timedelta(days=2), "not_after": now - datetime.timedelta(days=1)}
        cert = (ca or self.ca).issue_cert(*identities, **validity)
        crt = self._write(f"{name}.crt", b"".join(p.bytes() for p in cert.cert_chain_pems))
        key = self._write(f"{name}.key", cert.private_key_pem.bytes())
        return crt, key

    def config(self, name: str, *identities: str, ca: trustme.CA | None = None, trust: str | None = None,
               hostname: str | None = None, expired: bool = False) -> TlsConfig:
        crt, key = self.files(name, *identities, ca=ca, expired=expired)
        return TlsConfig(crt, key, trust or self.ca_file, hostname)

    def destination(self) -> TlsConfig:
        return self.config("destination", "127.0.0.1", "::1", "localhost")

    def source(self) -> TlsConfig:
        return self.config("source", "source.migration.test")

    def source_without_certificate(self) -> TlsConfig:
        """A source that trusts the right CA but presents no certificate of its own."""
        return NoCertificate("", "", self.ca_file)


class NoCertificate(TlsConfig):
    """What vmmctl never builds (it requires --tls-cert): a TLS 1.3 client that checks the
    destination against ``ca`` and shows none of its own, as a stranger's client would."""

    def identity(self) -> _core.TlsIdentity:
        with open(self.ca, "rb") as f:
            return _core.TlsIdentity(None, None, f.read())
