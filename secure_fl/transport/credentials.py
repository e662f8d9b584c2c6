"""Transport security: a run's certificate authority, the server's and each party's credentials.

``secure-fl provision`` (`provision`, `add_party`, `revoke`) writes one directory::

    DIR/ca/ca.key, ca.crt                 the run's CA (keep ca.key offline once provisioned)
    DIR/server/server.key, server.crt,    the server bundle: its key and certificate, the CA
               ca.crt, parties.json       certificate and the registry of valid party certificates
    DIR/parties/<id>/party.key,           one bundle per party: its key and certificate (the
               party.crt, ca.crt          party id is the certificate's common name), the CA

Every file is written 0600 (directories 0700). Keys are ECDSA P-256, certificates X.509 signed
with SHA-256 by the CA (all from ``cryptography``); serial numbers come from ``secrets``.

With a party bundle a client speaks mutual TLS: the server learns the party's identity from the
verified certificate, and that identity, not the ``client_id`` a message declares, is what the
round uses (`PeerIdentity`). The registry ``parties.json`` maps each party id to the serial of
its one valid certificate: `revoke` removes the entry, so that party is refused at Join and on
every later call (the server re-reads the registry when it changes on disk).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from secure_fl.errors import ConfigError
from secure_fl.transport.address import check_id

#: The registry of valid party certificates in a server bundle.
REGISTRY = "parties.json"
#: Days a provisioned certificate is valid.
DEFAULT_DAYS = 365


def _write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by its owner only (0600, its directories 0700), atomically."""
    for directory in (path.parent.parent, path.parent):  # DIR/parties and DIR/parties/<id>, DIR and DIR/ca
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "secure-fl"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    subject: str, key: ec.EllipticCurvePrivateKey, ca_key: ec.EllipticCurvePrivateKey, ca_name: x509.Name, *,
    days: int, usage: x509.ObjectIdentifier, names: list[x509.GeneralName],
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject)).issuer_name(ca_name).public_key(key.public_key())
        .serial_number(secrets.randbits(159) | 1).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
    )
    return builder.sign(ca_key, hashes.SHA256())


@dataclass(frozen=True)
class Provisioned:
    """What `provision` or `add_party` wrote: the directory and the party bundles by id."""

    root: Path
    server: Path
    parties: dict[str, Path] = field(default_factory=dict)


def provision(
    root: str | Path, parties: list[str], *, server_names: tuple[str, ...] = ("localhost",),
    server_ips: tuple[str, ...] = ("127.0.0.1",), days: int = DEFAULT_DAYS,
) -> Provisioned:
    """Create a run's CA, the server bundle and one bundle per party under ``root``.

    Refuses (`ConfigError`) a ``root`` that already holds a CA, a bad or repeated party id, or a
    bad IP address; the server certificate names ``server_names`` and ``server_ips``.
    """
    root = Path(root)
    if (root / "ca" / "ca.key").exists():
        raise ConfigError(f"{root} already holds a CA; use --add-party or --revoke, or another --out")
    if len(set(parties)) != len(parties):
        raise ConfigError(f"party ids repeat: {sorted(p for p in parties if parties.count(p) > 1)}")
    for party in parties:
        check_id(party, what="party id")
    try:
        ips = [ipaddress.ip_address(ip) for ip in server_ips]
    except ValueError as exc:
        raise ConfigError(f"server IP address: {exc}") from None
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("secure-fl run CA")
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(secrets.randbits(159) | 1).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    _write(root / "ca" / "ca.key", _key_pem(ca_key))
    _write(root / "ca" / "ca.crt", _cert_pem(ca_cert))
    server_key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in server_names] + [x509.IPAddress(ip) for ip in ips]
    server_cert = _issue("secure-fl server", server_key, ca_key, ca_name, days=days,
                         usage=ExtendedKeyUsageOID.SERVER_AUTH, names=names)
    server = root / "server"
    _write(server / "server.key", _key_pem(server_key))
    _write(server / "server.crt", _cert_pem(server_cert))
    _write(server / "ca.crt", _cert_pem(ca_cert))
    _write(server / REGISTRY, b"{}\n")
    out = Provisioned(root, server)
    for party in parties:
        out.parties[party] = _issue_party(root, party, days=days)
    return out


def add_party(root: str | Path, party: str, *, days: int = DEFAULT_DAYS) -> Path:
    """Issue a bundle for ``party`` with the CA under ``root``; refuse an id that already has one."""
    check_id(party, what="party id")
    root = Path(root)
    if party in _read_registry(root / "server" / REGISTRY):
        raise ConfigError(f"party {party!r} already has a valid certificate; --revoke it first to re-issue")
    return _issue_party(root, party, days=days)


def _issue_party(root: Path, party: str, *, days: int) -> Path:
    try:
        ca_key = serialization.load_pem_private_key((root / "ca" / "ca.key").read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate((root / "ca" / "ca.crt").read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"{root} holds no CA (ca/ca.key): run secure-fl provision --out {root} first") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{root}/ca/ca.key is not an EC key written by secure-fl provision")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _issue(party, key, ca_key, ca_cert.subject, days=days, usage=ExtendedKeyUsageOID.CLIENT_AUTH,
                  names=[x509.UniformResourceIdentifier(f"secure-fl://party/{party}")])
    bundle = root / "parties" / party
    _write(bundle / "party.key", _key_pem(key))
    _write(bundle / "party.crt", _cert_pem(cert))
    _write(bundle / "ca.crt", _cert_pem(ca_cert))
    registry_path = root / "server" / REGISTRY
    registry = _read_registry(registry_path)
    registry[party] = format(cert.serial_number, "x")
    _write(registry_path, (json.dumps(registry, indent=1, sort_keys=True) + "\n").encode())
    return bundle


def revoke(root: str | Path, party: str) -> None:
    """Remove ``party``'s certificate from the server's registry: it is refused from then on."""
    path = Path(root) / "server" / REGISTRY
    registry = _read_registry(path)
    if party not in registry:
        raise ConfigError(f"party {party!r} has no valid certificate in {path}")
    del registry[party]
    _write(path, (json.dumps(registry, indent=1, sort_keys=True) + "\n").encode())


def _read_registry(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing: not a server bundle written by secure-fl provision") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise ConfigError(f"{path} must map party ids to certificate serials")
    return data


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what}: {path} is missing (write the bundle with secure-fl provision)") from None


# ------------------------------------------------------------------------------------- server side
class PeerIdentity:
    """Who is calling, from the verified client certificate, checked against the registry.

    `authenticate` returns the party id of a call's certificate, or raises `Unauthenticated`
    naming why: no certificate, a certificate not in the registry (unknown or revoked), or one
    whose serial is not the registry's (a superseded certificate).
    """

    def __init__(self, registry: Path) -> None:
        self.path = registry
        self._lock = threading.Lock()
        self._mtime: float | None = None
        self._serials: dict[str, str] = {}
        self._load()

    def _load(self) -> None:
        mtime = self.path.stat().st_mtime_ns
        if mtime != self._mtime:
            self._serials = _read_registry(self.path)
            self._mtime = mtime

    def authenticate(self, context: grpc.ServicerContext) -> str:
        """The authenticated party id of this call (``Unauthenticated`` if there is none)."""
        auth = context.auth_context()
        pem = (auth.get("x509_pem_cert") or [b""])[0]
        if not pem:
            raise Unauthenticated("no client certificate: this server requires a party bundle (secure-fl provision)")
        cert = x509.load_pem_x509_certificate(pem)
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        party = str(names[0].value) if names else ""
        serial = format(cert.serial_number, "x")
        with self._lock:
            self._load()
            valid = self._serials.get(party)
        if valid is None:
            raise Unauthenticated(f"party {party!r} is unknown or revoked")
        if valid != serial:
            raise Unauthenticated(f"party {party!r} presented a certificate that is not its current one (serial {serial})")
        return party


class Unauthenticated(Exception):
    """A call without a valid party certificate (answered with UNAUTHENTICATED)."""


@dataclass(frozen=True)
class ServerTLS:
    """A server bundle loaded for gRPC: credentials, and the party registry when mTLS is on."""

    credentials: grpc.ServerCredentials
    identity: PeerIdentity | None

    @property
    def mode(self) -> str:
        """``"mtls"`` (party certificates required) or ``"tls"``."""
        return "mtls" if self.identity is not None else "tls"

    @classmethod
    def load(cls, bundle: str | Path, *, require_client_auth: bool = True) -> ServerTLS:
        """Read ``bundle`` (``DIR/server``); with ``require_client_auth`` every party needs its certificate."""
        bundle = Path(bundle)
        key = _read(bundle / "server.key", "server key")
        cert = _read(bundle / "server.crt", "server certificate")
        ca = _read(bundle / "ca.crt", "CA certificate")
        creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=require_client_auth)
        identity = PeerIdentity(bundle / REGISTRY) if require_client_auth else None
        return cls(creds, identity)


# ------------------------------------------------------------------------------------- client side
@dataclass(frozen=True)
class ClientTLS:
    """A party bundle (or only a CA certificate) loaded for gRPC."""

    credentials: grpc.ChannelCredentials
    party: str | None
    #: The name the server's certificate must carry (``grpc.ssl_target_name_override``), if not the host's.
    server_name: str | None = None

    @classmethod
    def load(cls, bundle: str | Path, *, server_name: str | None = None) -> ClientTLS:
        """Read a party bundle (``DIR/parties/<id>``) or a directory with only ``ca.crt`` (TLS without mTLS)."""
        bundle = Path(bundle)
        ca = _read(bundle / "ca.crt", "CA certificate")
        if (bundle / "party.crt").exists():
            key = _read(bundle / "party.key", "party key")
            cert_pem = _read(bundle / "party.crt", "party certificate")
            names = x509.load_pem_x509_certificate(cert_pem).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            party = str(names[0].value) if names else None
            return cls(grpc.ssl_channel_credentials(ca, key, cert_pem), party, server_name)
        return cls(grpc.ssl_channel_credentials(ca), None, server_name)
