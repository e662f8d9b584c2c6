"""Candidate HE settings for addition-only aggregation, measured on our protocol code path.

For each candidate (a `BFVAggregation` or `CKKSAggregation` built with its settings), n clients
with d values from U(-1, 1) and integer weights from [1, 100] (the same draws for every candidate,
from ``--seed``) run the round as `benchmarks/he.py` ``ours-*`` does: quantise (BFV), ``to_slots``,
`he.encrypt_slots`; the key-free server context loads (`he.load_chunks`) and adds
(`he.add_chunks`); `he.decrypt_slots` and ``decode``. One JSON line per candidate:

* ``bytes_per_value``: one client's serialised upload / d;
* ``encrypt_values_per_s`` (per client: quantise, pack, encrypt, serialise), ``load_values_per_s``
  and ``add_values_per_s`` (server: deserialise one upload; add one upload into the total),
  ``decrypt_values_per_s`` (load, decrypt, decode the sum);
* ``max_abs_err_rel_clip``: max abs error of the decrypted weighted mean against the float64
  weighted mean of the clipped updates, divided by the clip range (8);
* the parameters and the slot plan; a candidate the protocol refuses (e.g. a plaintext modulus
  too small for the bucket) prints ``refused`` with the protocol's message.

``*-uniform`` candidates call ``enable_uniform_weights()`` (every weight 1, as with client-level DP)
and are compared with the unweighted mean: BFV then has room to pack two values per slot.

Run:  .venv/bin/python benchmarks/he_params.py --n 10 --d 2e5 --seed 0
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterator

import numpy as np

from protocols._hazmat import he
from protocols.secagg.he import BFVAggregation, CKKSAggregation, HomomorphicAggregation

now = time.perf_counter

CLIP_RANGE = 8.0
MAX_CLIENT_WEIGHT = 100

#: name -> (protocol factory, uniform weights)
CANDIDATES: dict[str, tuple[Callable[[int], HomomorphicAggregation], bool]] = {
    "ckks-4096-auto-2^25 (ours default)": (lambda w: CKKSAggregation(max_weight=w), False),
    "ckks-4096-[40,40]-2^25": (lambda w: CKKSAggregation(coeff_mod_bit_sizes=(40, 40), max_weight=w), False),
    "ckks-4096-[54,55]-2^30": (lambda w: CKKSAggregation(coeff_mod_bit_sizes=(54, 55), scale_bits=30, max_weight=w), False),
    "ckks-4096-[60,49]-2^40": (lambda w: CKKSAggregation(coeff_mod_bit_sizes=(60, 49), scale_bits=40, max_weight=w), False),
    "ckks-8192-[60,40,40]-2^40 (flare)": (
        lambda w: CKKSAggregation(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 40), scale_bits=40, max_weight=w),
        False,
    ),
    "bfv-4096-[54,55]-auto (ours default)": (lambda w: BFVAggregation(max_weight=w), False),
    "bfv-4096-[54,55]-pack1": (lambda w: BFVAggregation(pack=1, max_weight=w), False),
    "bfv-4096-[40,40]-auto": (lambda w: BFVAggregation(coeff_mod_bit_sizes=(40, 40), max_weight=w), False),
    "bfv-4096-[54,55]-auto-uniform": (lambda w: BFVAggregation(max_weight=w), True),
    "ckks-4096-auto-2^25-uniform": (lambda w: CKKSAggregation(max_weight=w), True),
}


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", "-n", type=int, default=10, help="clients summed")
    p.add_argument("--d", "-d", type=float, default=2e5, help="values per update")
    p.add_argument("--max-weight", type=int, default=1024, help="the protocols' max_weight W (their default 1024)")
    p.add_argument("--seed", type=int, default=0, help="seed of the updates and weights (not of any key)")
    p.add_argument("--only", default="", help="run only candidates whose name contains this")
    return p.parse_args()


def clients(n: int, d: int, seed: int, uniform: bool) -> Iterator[tuple[np.ndarray, int]]:
    """The n (update, weight) pairs, regenerated from ``seed`` (the same updates for every candidate)."""
    rng = np.random.default_rng(seed)
    weights = rng.integers(1, MAX_CLIENT_WEIGHT + 1, size=n)
    for i in range(n):
        yield rng.uniform(-1.0, 1.0, size=d).astype(np.float32), 1 if uniform else int(weights[i])


def measure(protocol: HomomorphicAggregation, n: int, d: int, seed: int, uniform: bool) -> dict[str, object]:
    """One streamed round of ``protocol``; throughputs, size, error and plan."""
    if uniform:
        protocol.enable_uniform_weights()
    params = protocol.parameters(n)
    plan = protocol.plan(n, d + 1, params)
    secret, keyless = he.new_secret_context(params), he.server_context(params)
    expected, weight_sum = np.zeros(d), 0
    total = None
    enc, load, add, upload = [], 0.0, 0.0, 0
    for x, w in clients(n, d, seed, uniform):
        expected += w * np.clip(x.astype(np.float64), -CLIP_RANGE, CLIP_RANGE)
        weight_sum += w
        t0 = now()
        flat = protocol.quantise_flat(x) if isinstance(protocol, BFVAggregation) else x.astype(np.float64)
        chunks = he.encrypt_slots(secret, params, protocol.to_slots(flat, w, plan))
        enc.append(now() - t0)
        upload = sum(len(c) for c in chunks)
        t0 = now()
        vectors = he.load_chunks(keyless, params, chunks, plan.chunk_sizes)
        t1 = now()
        total = he.add_chunks(total, vectors)
        load, add = load + (t1 - t0), add + (now() - t1)
        del flat, chunks, vectors
    assert total is not None
    summed = [v.serialize() for v in total]
    del total
    t0 = now()
    weighted, weight = protocol.decode(he.decrypt_slots(secret, params, summed, plan.chunk_sizes), plan, n)
    mean = weighted / weight
    decrypt_s = now() - t0
    err = float(np.max(np.abs(mean - expected / weight_sum)))
    plan_info: dict[str, object] = {"per_slot": plan.per_slot, "weight_bound": plan.weight_bound, "slots": plan.slots}
    if params.scheme == "bfv":
        plan_info |= {"field_bits": plan.field_bits, "levels": plan.levels,
                      "plain_modulus_bits": params.plain_modulus.bit_length()}
    else:
        plan_info |= {"headroom_bits": params.headroom_bits}
    return {
        "bytes_per_value": round(upload / d, 3),
        "upload_bytes": upload,
        "encrypt_values_per_s": round(d / statistics.fmean(enc)),
        "load_values_per_s": round(d * n / load),
        "add_values_per_s": round(d * (n - 1) / add) if add > 0 else None,
        "decrypt_values_per_s": round(d / decrypt_s),
        "max_abs_err": err,
        "max_abs_err_rel_clip": err / CLIP_RANGE,
        "total_weight": weight,
        "params": {"scheme": params.scheme, "poly_modulus_degree": params.poly_modulus_degree,
                   "coeff_mod_bit_sizes": list(params.coeff_mod_bit_sizes), "scale_bits": params.scale_bits},
        "plan": plan_info,
    }


def main() -> None:
    """Measure every candidate (or those named by ``--only``) and print one JSON line each."""
    a = parse_args()
    n, d = a.n, int(a.d)
    for name, (factory, uniform) in CANDIDATES.items():
        if a.only and a.only not in name:
            continue
        head = {"bench": "he_params", "candidate": name, "n": n, "d": d, "max_weight": a.max_weight, "seed": a.seed}
        try:
            record = measure(factory(a.max_weight), n, d, a.seed, uniform)
        except ValueError as exc:  # the protocol refuses these settings for this bucket
            record = {"refused": str(exc)}
        print(json.dumps(head | record), flush=True)


if __name__ == "__main__":
    main()
