"""Transport security with real certificates (``cryptography``) and real TLS (grpc) on loopback.

Refused: no credentials, a certificate from another CA, a revoked party (at Join and on a later
call), one party acting as another, a replayed upload (in the same round, in a later round, on
another party's connection); accepted: a provisioned party over mutual TLS. The run records what
its port spoke and the privacy report flags a plaintext run [high].
"""

from __future__ import annotations

import json
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocols.wire.v1 import federation_pb2 as pb
from secure_fl.api import Server, run_client
from secure_fl.client.client import ClientStages, FederatedClient
from secure_fl.client.trainer import LocalTrainer
from secure_fl.data.sources import client_dataset
from secure_fl.errors import ConfigError, TransportError
from secure_fl.transport.credentials import ClientTLS, ServerTLS, add_party, provision, revoke
from secure_fl.transport.grpc_client import GrpcTransport
from tests.conftest import smoke_config

CONFIG = ("run.num_clients=2", "run.clients_per_round=2", "run.join_timeout=60")


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    provision(tmp_path / "pki", ["client-0", "client-1"])
    return tmp_path / "pki"


@pytest.fixture
def server(pki: Path, tmp_path: Path) -> Iterator[Server]:
    running = Server(smoke_config(*CONFIG), address="127.0.0.1:0", out_dir=tmp_path / "run",
                     tls=ServerTLS.load(pki / "server")).start()
    yield running
    running.stop()


def _client(party: str, transport: GrpcTransport) -> FederatedClient:
    config = smoke_config(*CONFIG)
    trainer = LocalTrainer.from_config(config, client_dataset(config, int(party.rsplit("-", 1)[1])))
    return FederatedClient(party, transport, trainer, ClientStages.from_config(config))


def _tls(pki: Path, party: str) -> ClientTLS:
    return ClientTLS.load(pki / "parties" / party, server_name="localhost")


def test_every_file_is_owner_only_and_the_registry_names_each_party(pki: Path) -> None:
    files = [p for p in pki.rglob("*") if p.is_file()]
    assert len(files) == 3 + 4 + 2 * 3 - 1  # ca: key, crt; server: key, crt, ca, registry; parties: 3 each
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for path in [pki, *(p for p in pki.rglob("*") if p.is_dir())]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    assert sorted(json.loads((pki / "server" / "parties.json").read_text())) == ["client-0", "client-1"]
    with pytest.raises(ConfigError, match="already holds a CA"):
        provision(pki, ["client-2"])


def test_a_provisioned_party_joins_over_mutual_tls(pki: Path, server: Server) -> None:
    reply = _client("client-0", GrpcTransport(server.address, tls=_tls(pki, "client-0"))).join()
    assert reply.envelope.run_id == server.run_id
    info = server.federated.run_dir.read_run_info()
    assert info["transport_security"] == "mtls"


def test_no_credentials_are_refused(pki: Path, server: Server) -> None:
    with pytest.raises(TransportError) as plaintext:
        _client("client-0", GrpcTransport(server.address)).join()
    assert plaintext.value.code == "UNAVAILABLE"
    ca_only = ClientTLS.load(pki / "server", server_name="localhost")  # the CA, but no party certificate
    with pytest.raises(TransportError) as no_cert:
        _client("client-0", GrpcTransport(server.address, tls=ca_only)).join()
    assert no_cert.value.code in ("UNAVAILABLE", "UNAUTHENTICATED")


def test_a_certificate_from_another_ca_is_refused(tmp_path: Path, server: Server) -> None:
    other = provision(tmp_path / "other", ["client-0"])
    with pytest.raises(TransportError) as info:
        _client("client-0", GrpcTransport(server.address, tls=_tls(other.root, "client-0"))).join()
    assert info.value.code == "UNAVAILABLE"  # the handshake fails: no call reaches the coordinator
    assert server.federated.coordinator.active_clients() == []


def test_a_revoked_party_is_refused_at_join_and_on_every_later_call(pki: Path, server: Server) -> None:
    joined = _client("client-1", GrpcTransport(server.address, tls=_tls(pki, "client-1")))
    joined.join()
    revoke(pki, "client-1")
    with pytest.raises(TransportError) as later:
        joined.transport.pull_task(pb.PullTaskRequest(envelope=joined._envelope()))
    assert later.value.code == "UNAUTHENTICATED" and "unknown or revoked" in later.value.details
    with pytest.raises(TransportError) as again:
        _client("client-1", GrpcTransport(server.address, tls=_tls(pki, "client-1"))).join()
    assert again.value.code == "UNAUTHENTICATED"
    # a re-issued certificate is a new one; the old certificate stays refused
    add_party(pki, "client-1")
    with pytest.raises(TransportError) as old:
        joined.transport.pull_task(pb.PullTaskRequest(envelope=joined._envelope()))
    assert old.value.code == "UNAUTHENTICATED" and "not its current one" in old.value.details


def test_one_party_cannot_act_as_another(pki: Path, server: Server) -> None:
    victim = _client("client-1", GrpcTransport(server.address, tls=_tls(pki, "client-1")))
    victim.join()
    # client-0's certificate, client-1's id: Join, a poll and a Leave in its name are all refused
    thief = _client("client-1", GrpcTransport(server.address, tls=_tls(pki, "client-0")))
    for call in (thief.join, lambda: thief.transport.pull_task(pb.PullTaskRequest(envelope=thief._envelope())),
                 lambda: thief.transport.leave(pb.LeaveRequest(envelope=thief._envelope(), reason="stolen"))):
        with pytest.raises(TransportError) as info:
            call()
        assert info.value.code == "PERMISSION_DENIED" and "authenticated party 'client-0'" in info.value.details
    assert server.federated.coordinator.active_clients() == ["client-1"]  # the victim is still in the run
    with pytest.raises(ConfigError, match="a party may only act as the identity in its certificate"):
        run_client(smoke_config(*CONFIG), server=server.address, client_id="client-1", tls=_tls(pki, "client-0"))


def test_tls_without_client_certificates_when_asked(pki: Path, tmp_path: Path) -> None:
    running = Server(smoke_config(*CONFIG), address="127.0.0.1:0", out_dir=tmp_path / "tls-only",
                     tls=ServerTLS.load(pki / "server", require_client_auth=False)).start()
    try:
        ca_only = ClientTLS.load(pki / "server", server_name="localhost")
        assert _client("client-0", GrpcTransport(running.address, tls=ca_only)).join().envelope.run_id == running.run_id
        info = running.federated.run_dir.read_run_info()
        assert info["transport_security"] == "tls"
    finally:
        running.stop()


class Recording(GrpcTransport):
    """A party's real transport that keeps a copy of every upload stream it sends."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.sent: list[list[pb.UpdateChunk]] = []

    def push_update(self, messages):  # type: ignore[no-untyped-def]
        kept = list(messages)
        self.sent.append(kept)
        return super().push_update(iter(kept))


def _step_until(client: FederatedClient, outcome: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while client.step() != outcome:
        assert time.monotonic() < deadline, f"{client.client_id} never reached {outcome!r}"
        time.sleep(0.05)


def test_replayed_and_stolen_uploads_are_refused(pki: Path, server: Server) -> None:
    recording = Recording(server.address, tls=_tls(pki, "client-0"))
    first, second = _client("client-0", recording), _client("client-1", GrpcTransport(server.address, tls=_tls(pki, "client-1")))
    first.join()
    second.join()
    _step_until(first, "trained")  # round 1: client-0's upload accepted, client-1's still owed
    upload = recording.sent[-1]
    with pytest.raises(TransportError) as same_round:
        recording.push_update(iter(upload))
    assert same_round.value.code in ("ALREADY_EXISTS", "FAILED_PRECONDITION"), same_round.value
    with pytest.raises(TransportError) as stolen:  # client-1's connection sends client-0's captured upload
        second.transport.push_update(iter(upload))
    assert stolen.value.code == "PERMISSION_DENIED"
    _step_until(second, "trained")  # round 1 closes; round 2 opens
    _step_until(first, "trained")
    with pytest.raises(TransportError) as old_round:
        recording.push_update(iter(upload))
    assert old_round.value.code == "FAILED_PRECONDITION" and "round 1" in old_round.value.details
    records: list[dict[str, object]] = []
    deadline = time.monotonic() + 60
    while len(records) < 1 and time.monotonic() < deadline:
        records = [json.loads(line) for line in server.federated.run_dir.metrics_path.read_text().splitlines() if line]
        time.sleep(0.1)
    assert records[0]["clients"] == 2 and records[0]["status"] == "ok"  # one upload each, the replays left out
