"""Write tests/vectors/secaggplus_masked.json: known answers of SecAgg+ masked inputs and unmasked sums.

Every input is fixed here: each client's X25519 mask private key (``load_private_key`` of fixed
bytes), its self-mask seed, its input words (the weight as the last word, as the protocol sends
it), the neighbour graph, the protocol instance (run, round, bucket) and who drops after
share-keys. The outputs come from the library (`protocols.secagg.secaggplus_masks`): each client's
masked words and their packed upload, and the exact unmasked sum of the survivors.
tests/test_secaggplus_vectors.py checks the library still produces them and recomputes them with
the pure-Python X25519, HKDF and ChaCha20 of tests/vectors/reference_hazmat.py.

Invalid cases, each with the vector it produces: a survivor's wrong self-mask seed, forgetting a
dropped client's pairwise masks, a client masking with a key that is not the one it advertised,
and a client masking for the wrong round. None of them gives the true sum, and none decodes:
the weight word of the result falls outside ``[n, n * max_weight]``.

Run from the repository root:  PYTHONPATH=. python tests/vectors/generate_secaggplus.py
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from protocols._hazmat import load_private_key, public_key_to_bytes
from protocols.secagg.packing import pack_words
from protocols.secagg.secaggplus_masks import (
    DroppedClient,
    mask_input,
    sum_words,
    unmask_sum,
)

OUT = Path(__file__).resolve().parent / "secaggplus_masked.json"
MAX_WEIGHT = 4


def fixed(label: str, n: int = 32) -> bytes:
    """Deterministic test bytes (SHA-256 of a label): for vectors only, never keys in use."""
    return hashlib.sha256(f"secaggplus/{label}".encode()).digest()[:n]


def _inputs(case: str, clients: list[str], count: int, bits: int) -> dict[str, list[int]]:
    """Small fixed input words in [0, 2^(bits - 4)) and a weight in [1, MAX_WEIGHT] as the last word."""
    out = {}
    for i, c in enumerate(clients):
        digest = hashlib.sha256(f"{case}/{c}/values".encode()).digest() * (1 + count * 4 // 32)
        top = 1 << max(1, bits - 4)
        words = [int.from_bytes(digest[4 * j : 4 * j + 4], "little") % top for j in range(count - 1)]
        out[c] = words + [1 + i % MAX_WEIGHT]
    return out


def _mask(case: dict[str, Any], c: str, *, key_label: str | None = None, round_delta: int = 0) -> list[int]:
    """Client c's masked words, from the case's fixed inputs (optionally with a wrong key or round)."""
    me = case["clients"][c]
    key = load_private_key(bytes.fromhex(me["mask_private_key"]) if key_label is None else fixed(key_label))
    publics = {v: load_private_key(bytes.fromhex(case["clients"][v]["mask_private_key"])).public_key()
               for v in me["neighbours"] if v in case["shared"]}
    words = mask_input(
        me["values"], bits=case["bits"], me=c, self_seed=bytes.fromhex(me["self_seed"]), mask_private_key=key,
        neighbour_mask_publics=publics, run_id=case["run_id"], round=case["round"] + round_delta, bucket=case["bucket"],
    )
    return [int(w) for w in words]


def _unmask(case: dict[str, Any], masked: dict[str, list[int]], *, seeds: dict[str, bytes] | None = None,
            with_dropped: bool = True) -> list[int]:
    """The server's unmasked sum of the survivors' masked words."""
    survivors = case["survivors"]
    clients = case["clients"]
    seeds = seeds or {u: bytes.fromhex(clients[u]["self_seed"]) for u in survivors}
    dropped = {}
    if with_dropped:
        for d in case["dropped"]:
            dropped[d] = DroppedClient(
                load_private_key(bytes.fromhex(clients[d]["mask_private_key"])),
                {v: load_private_key(bytes.fromhex(clients[v]["mask_private_key"])).public_key()
                 for v in clients[d]["neighbours"] if v in survivors},
            )
    total = sum_words([masked[u] for u in survivors], bits=case["bits"])
    out = unmask_sum(total, bits=case["bits"], survivor_seeds=seeds, dropped=dropped, run_id=case["run_id"],
                     round=case["round"], bucket=case["bucket"])
    return [int(w) for w in out]


def _case(name: str, *, bits: int, count: int, graph: dict[str, list[str]], drops: list[str],
          run_id: str = "run-vectors", rnd: int = 7, bucket: int = 0) -> dict[str, Any]:
    ids = sorted(graph)
    values = _inputs(name, ids, count, bits)
    clients = {}
    for c in ids:
        private = fixed(f"{name}/{c}/mask-key")
        clients[c] = {
            "mask_private_key": private.hex(),
            "mask_public_key": public_key_to_bytes(load_private_key(private).public_key()).hex(),
            "self_seed": fixed(f"{name}/{c}/seed").hex(),
            "neighbours": graph[c],
            "values": values[c],
        }
    case: dict[str, Any] = {
        "name": name, "bits": bits, "count": count, "run_id": run_id, "round": rnd, "bucket": bucket,
        "max_weight": MAX_WEIGHT, "clients": clients, "shared": ids,
        "survivors": [c for c in ids if c not in drops], "dropped": sorted(drops),
    }
    masked = {c: _mask(case, c) for c in ids}
    for c in ids:
        clients[c]["masked"] = masked[c]
        clients[c]["packed"] = pack_words(masked[c], bits).hex()
    case["sum"] = _unmask(case, masked)
    plain = sum_words([values[u] for u in case["survivors"]], bits=bits)
    assert case["sum"] == [int(w) for w in plain], name  # the masks cancel
    return case


def _invalid(case: dict[str, Any]) -> list[dict[str, Any]]:
    """Wrong keys or instances: each gives a vector other than the true sum, one that does not decode."""
    masked = {c: case["clients"][c]["masked"] for c in case["shared"]}
    first = case["survivors"][0]
    seeds = {u: bytes.fromhex(case["clients"][u]["self_seed"]) for u in case["survivors"]}
    rows = [{
        "name": "wrong-self-seed", "note": f"the server unmasks {first} with a seed that is not its own",
        "wrong_seed": {first: fixed("wrong-seed").hex()},
        "result": _unmask(case, masked, seeds={**seeds, first: fixed("wrong-seed")}),
    }]
    if case["dropped"]:
        rows.append({
            "name": "dropped-masks-left-in", "note": "the server forgets the dropped clients' pairwise masks",
            "result": _unmask(case, masked, with_dropped=False),
        })
    wrong_key = _mask(case, first, key_label="not-the-advertised-key")
    rows.append({
        "name": "wrong-mask-key", "note": f"{first} masks with a key that is not the one it advertised",
        "client": first, "wrong_mask_private_key": fixed("not-the-advertised-key").hex(), "masked": wrong_key,
        "result": _unmask(case, {**masked, first: wrong_key}),
    })
    wrong_round = _mask(case, first, round_delta=1)
    rows.append({
        "name": "wrong-round", "note": f"{first} masks for round {case['round'] + 1} instead of {case['round']}",
        "client": first, "round": case["round"] + 1, "masked": wrong_round,
        "result": _unmask(case, {**masked, first: wrong_round}),
    })
    n = len(case["survivors"])
    for row in rows:
        assert row["result"] != case["sum"] and not n <= row["result"][-1] <= n * MAX_WEIGHT, row["name"]
    return rows


def main() -> None:
    complete3 = {"client-1": ["client-2", "client-3"], "client-2": ["client-1", "client-3"],
                 "client-3": ["client-1", "client-2"]}
    complete4 = {c: [v for v in ("client-1", "client-2", "client-3", "client-4") if v != c]
                 for c in ("client-1", "client-2", "client-3", "client-4")}
    ring4 = {"client-1": ["client-2", "client-4"], "client-2": ["client-1", "client-3"],
             "client-3": ["client-2", "client-4"], "client-4": ["client-1", "client-3"]}
    cases = [
        _case("three-b8", bits=8, count=6, graph=complete3, drops=[]),
        _case("three-b13", bits=13, count=9, graph=complete3, drops=[]),
        _case("ring-b20", bits=20, count=7, graph=ring4, drops=[]),
        _case("four-b30-client-3-drops", bits=30, count=40, graph=complete4, drops=["client-3"]),
        _case("ring-b32-client-2-drops", bits=32, count=20, graph=ring4, drops=["client-2"], run_id="rün-b", rnd=0,
              bucket=3),
    ]
    for case in cases:
        case["invalid"] = _invalid(case)
    data = {
        "comment": "generated by tests/vectors/generate_secaggplus.py; do not edit by hand",
        "info_self_mask": "secure-fl/secagg/v1/self-mask",
        "info_pairwise_mask": "secure-fl/secagg/v1/pairwise-mask",
        "cases": cases,
        "oracle": {"bits": 8, "ids": [1, 2, 3], "x": [5, 7, 9], "m": {"1,2": 10, "1,3": 20, "2,3": 30},
                   "y": [35, 27, 215], "sum": 21, "client_3_drops_sum": 12},
    }
    OUT.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
