"""Homomorphic aggregation, ours (``bfv``, ``ckks``) against NVFlare's CKKS recipe, in one process.

N clients, each with a float32 update of d values drawn from U(-1, 1) and an integer weight drawn
from [1, 100]. Every scheme sees the same updates and weights (drawn from ``--seed``), clipped to
the clip range 8 (a no-op for U(-1, 1), but the reference is the clipped mean).

* ``ours-bfv`` / ``ours-ckks``: the protocol objects' own code path at their defaults
  (`BFVAggregation()`, `CKKSAggregation()`): ``parameters(N)``, ``plan(N, d + 1, params)``, then per
  client ``quantise_flat`` (BFV), ``to_slots`` and `he.encrypt_slots` under one
  `he.new_secret_context` (the round key every client holds); the server loads and adds each
  upload with the key-free `he.server_context` (`he.load_chunks`, `he.add_chunks`) and
  serialises the sum for the decrypting client, which runs `he.decrypt_slots`; the protocol's
  ``decode`` turns the slots into the weighted sum and the total weight.
* ``flare``: NVFlare's defaults (``HEBuilder``: CKKS, N = 8192, [60, 40, 40], scale 2^40,
  symmetric key shared by the clients). Clients encrypt ``w * x`` as CKKS vectors of 4096 slots,
  the server (context without secret key) loads and adds them and multiplies by ``1 / sum(w)``
  (``HEInTimeAccumulateWeightedAggregator``), a client decrypts.

Clients are streamed: client i is encrypted, its upload loaded and added into the server's total,
then dropped, so memory holds one client's plaintext and ciphertext plus the running total.

Prints one JSON line per scheme (``scheme``, ``n``, ``d``, ``bytes_per_param``, ``upload_bytes``,
``encrypt_s`` (mean per client: quantise, weight, pack, encrypt, serialise), ``aggregate_s`` (server:
load and add every upload, FLARE's 1/sum(w) multiply, serialise the result), ``decrypt_s`` (load,
decrypt, decode), ``max_abs_err`` of the decrypted weighted mean against the float64 weighted
mean of the clipped updates, ``max_abs_err_rel_clip``, and the plan), then, when FLARE and one of
ours ran, ``{"ratios": {scheme: {metric: ours / flare}}}``.

Run:  .venv/bin/python benchmarks/he.py --n 10 --d 1e5 --scheme all --seed 0
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Iterator

import numpy as np
import tenseal as ts

from protocols._hazmat import he
from protocols.secagg.he import BFVAggregation, CKKSAggregation, HomomorphicAggregation

now = time.perf_counter

CLIP_RANGE = 8.0
MAX_CLIENT_WEIGHT = 100
SCHEMES = ("ours-bfv", "ours-ckks", "flare")
RATIO_KEYS = ("bytes_per_param", "encrypt_s", "aggregate_s", "decrypt_s")

#: NVFlare's HEBuilder defaults (nvflare/lighter/impl/he.py) and its vector length per ciphertext.
FLARE_N, FLARE_COEFF, FLARE_SCALE_BITS = 8192, (60, 40, 40), 40
FLARE_CHUNK = FLARE_N // 2


def parse_args() -> argparse.Namespace:
    """Command-line options: clients, values per update, schemes, seed."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", "-n", type=int, default=10, help="clients in the round (one bucket)")
    p.add_argument("--d", "-d", type=float, default=1e5, help="float32 values per update")
    p.add_argument("--scheme", choices=(*SCHEMES, "all"), default="all")
    p.add_argument("--seed", type=int, default=0, help="seed of the updates and weights (not of any key)")
    return p.parse_args()


def clients(n: int, d: int, seed: int) -> Iterator[tuple[np.ndarray, int]]:
    """The n (update, weight) pairs, regenerated from ``seed`` on every call (same for every scheme)."""
    rng = np.random.default_rng(seed)
    weights = rng.integers(1, MAX_CLIENT_WEIGHT + 1, size=n)
    for i in range(n):
        yield rng.uniform(-1.0, 1.0, size=d).astype(np.float32), int(weights[i])


def reference_mean(n: int, d: int, seed: int) -> np.ndarray:
    """The float64 weighted mean of the clipped updates."""
    total, weight = np.zeros(d, dtype=np.float64), 0
    for x, w in clients(n, d, seed):
        total += w * np.clip(x.astype(np.float64), -CLIP_RANGE, CLIP_RANGE)
        weight += w
    return total / weight


def run_ours(protocol: HomomorphicAggregation, n: int, d: int, seed: int) -> tuple[dict[str, object], np.ndarray]:
    """One round of ``protocol`` on the streamed clients: the timings, sizes and plan, and the decrypted mean."""
    params = protocol.parameters(n)
    plan = protocol.plan(n, d + 1, params)
    secret = he.new_secret_context(params)  # the key leader's round key; every client encrypts with it
    keyless = he.server_context(params)
    total = None
    encrypt_s, aggregate_s, upload_bytes = [], 0.0, 0
    for x, w in clients(n, d, seed):
        t0 = now()
        flat = protocol.quantise_flat(x) if isinstance(protocol, BFVAggregation) else x.astype(np.float64)
        chunks = he.encrypt_slots(secret, params, protocol.to_slots(flat, w, plan))
        encrypt_s.append(now() - t0)
        upload_bytes = sum(len(c) for c in chunks)
        t0 = now()
        total = he.add_chunks(total, he.load_chunks(keyless, params, chunks, plan.chunk_sizes))
        aggregate_s += now() - t0
        del flat, chunks
    assert total is not None
    t0 = now()
    summed = [v.serialize() for v in total]  # what the server sends the decrypting client
    aggregate_s += now() - t0
    del total
    t0 = now()
    slots = he.decrypt_slots(secret, params, summed, plan.chunk_sizes)
    weighted, weight = protocol.decode(slots, plan, n)
    mean = weighted / weight
    decrypt_s = now() - t0
    record: dict[str, object] = {
        "upload_bytes": upload_bytes, "encrypt_s": statistics.fmean(encrypt_s), "aggregate_s": aggregate_s,
        "decrypt_s": decrypt_s, "chunks": len(plan.chunk_sizes), "slots": plan.slots,
        "params": {"poly_modulus_degree": params.poly_modulus_degree,
                   "coeff_mod_bit_sizes": list(params.coeff_mod_bit_sizes), "scale_bits": params.scale_bits},
        "plan": {"per_slot": plan.per_slot, "weight_bound": plan.weight_bound},
    }
    if params.scheme == "bfv":
        record["plan"] |= {"field_bits": plan.field_bits, "levels": plan.levels,  # type: ignore[operator]
                           "plain_modulus_bits": params.plain_modulus.bit_length()}
    return record, mean


def _flare_context() -> ts.Context:
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=FLARE_N, coeff_mod_bit_sizes=list(FLARE_COEFF),
                     encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC, n_threads=1)
    ctx.global_scale = float(2**FLARE_SCALE_BITS)
    ctx.generate_relin_keys()
    return ctx


def run_flare(n: int, d: int, seed: int) -> tuple[dict[str, object], np.ndarray]:
    """NVFlare's recipe on the streamed clients: the timings and sizes, and the decrypted mean."""
    secret = _flare_context()  # the client kits' context, secret key included
    server = ts.context_from(secret.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=False,
                                              save_relin_keys=True), n_threads=1)
    total, weight = None, 0
    encrypt_s, aggregate_s, upload_bytes = [], 0.0, 0
    for x, w in clients(n, d, seed):
        t0 = now()
        weighted = np.clip(x.astype(np.float64), -CLIP_RANGE, CLIP_RANGE) * w
        chunks = [ts.ckks_vector(secret, weighted[i : i + FLARE_CHUNK].tolist()).serialize()
                  for i in range(0, d, FLARE_CHUNK)]
        encrypt_s.append(now() - t0)
        upload_bytes = sum(len(c) for c in chunks)
        weight += w  # sent in plaintext (FLARE's n_iter meta)
        t0 = now()
        vectors = [ts.ckks_vector_from(server, c) for c in chunks]
        if total is None:
            total = vectors
        else:
            for acc, v in zip(total, vectors):
                acc += v
        aggregate_s += now() - t0
        del weighted, chunks, vectors
    assert total is not None
    t0 = now()
    summed = [(v * (1.0 / weight)).serialize() for v in total]
    aggregate_s += now() - t0
    del total
    t0 = now()
    mean = np.concatenate([np.asarray(ts.ckks_vector_from(secret, c).decrypt(), dtype=np.float64) for c in summed])
    decrypt_s = now() - t0
    record: dict[str, object] = {
        "upload_bytes": upload_bytes, "encrypt_s": statistics.fmean(encrypt_s), "aggregate_s": aggregate_s,
        "decrypt_s": decrypt_s, "chunks": len(summed), "slots": d,
        "params": {"poly_modulus_degree": FLARE_N, "coeff_mod_bit_sizes": list(FLARE_COEFF),
                   "scale_bits": FLARE_SCALE_BITS},
        "plan": {"per_slot": 1, "weight_bound": None},
    }
    return record, mean


def main() -> None:
    """Run the chosen schemes one after another and print their JSON lines, then the ratios."""
    a = parse_args()
    n, d = a.n, int(a.d)
    if n < 3:
        raise SystemExit(f"--n {n}: the protocols need a bucket of at least 3 clients")
    expected = reference_mean(n, d, a.seed)
    chosen = SCHEMES if a.scheme == "all" else (a.scheme,)
    results: dict[str, dict[str, object]] = {}
    for scheme in chosen:
        wall0 = now()
        if scheme == "flare":
            record, mean = run_flare(n, d, a.seed)
        else:
            protocol = BFVAggregation() if scheme == "ours-bfv" else CKKSAggregation()
            record, mean = run_ours(protocol, n, d, a.seed)
        err = float(np.max(np.abs(mean - expected)))
        line = {
            "bench": "he", "scheme": scheme, "n": n, "d": d, "seed": a.seed,
            "bytes_per_param": round(int(record["upload_bytes"]) / d, 3),  # type: ignore[call-overload]
            **record, "max_abs_err": err, "max_abs_err_rel_clip": err / CLIP_RANGE, "clip_range": CLIP_RANGE,
            "wall_s": round(now() - wall0, 2),
        }
        for key in ("encrypt_s", "aggregate_s", "decrypt_s"):
            line[key] = round(float(line[key]), 5)
        results[scheme] = line
        print(json.dumps(line), flush=True)
    if "flare" in results and len(results) > 1:
        base = results["flare"]
        ratios = {s: {k: round(float(r[k]) / float(base[k]), 4) for k in RATIO_KEYS}  # type: ignore[arg-type]
                  for s, r in results.items() if s != "flare"}
        print(json.dumps({"ratios": ratios, "n": n, "d": d}), flush=True)


if __name__ == "__main__":
    main()
