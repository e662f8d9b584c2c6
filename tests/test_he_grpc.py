"""Homomorphic aggregation end to end over real gRPC on loopback: the ``secure-fl-server`` binary and
four ``secure-fl-client`` processes, two rounds of the smoke preset with ``secure.mode = "bfv"``.

Checked: both rounds complete with the four phases; the ciphertexts travelled (bytes per round
and per phase in ``metrics.jsonl``, the upload larger than the float32 update it encrypts, as a
ciphertext is); the released adapter scores like the plain run of the same preset (training is
seeded per round and client; the only difference is the quantisation, within noise).
"""

from __future__ import annotations

from pathlib import Path

from protocols.secagg import he_plan as hp
from secure_fl.simulation import simulate
from tests.conftest import smoke_config
from tests.test_cli_e2e import Procs, _federate, _metrics, procs  # noqa: F401 (fixture)

CLIENTS = [(f"client-{i}", ()) for i in range(4)]


def test_bfv_over_grpc_with_four_client_processes(tmp_path: Path, procs: Procs) -> None:  # noqa: F811
    out = tmp_path / "server-run"
    clients = _federate(procs, out, CLIENTS, ("--set", "secure.mode='bfv'", "--set", "transport.poll_interval=0.2"))
    records = _metrics(out)
    assert [r["round"] for r in records] == [1, 2] and all(r["status"] == "ok" for r in records), records
    for record in records:
        assert record["clients"] == 4 and [p["phase"] for p in record["phases"]] == list(hp.PHASES)
        upload = next(p for p in record["phases"] if p["phase"] == hp.ENCRYPTED_INPUT)
        assert upload["answered"] == 4 and upload["bytes_up"] > 0 and record["bytes_up"] >= upload["bytes_up"]
    for client in clients:
        assert "trained rounds [1, 2]" in client.stdout, procs.describe()
    plain = simulate(smoke_config(), tmp_path / "plain", progress=False)
    assert abs(records[-1]["accuracy"] - plain.final_accuracy) <= 0.05, (records[-1]["accuracy"], plain.final_accuracy)
