"""Cost of the SecAgg+ quantisation building blocks: quantise + pack, unpack + modular sum.

Quantises ``--dim`` float32 values with the plan for ``--clients`` clients (c = 8, Q = 2^22,
W = 1 by default: 30-bit words), packs them, then unpacks and adds ``--clients`` such uploads
mod 2^b the way a server would (no masks: masking adds one more modular addition per client).
Prints one JSON line: seconds for each step, packed bytes per client, the ratio to the float32
update's bytes, and the plan's bits.

Run:  python benchmarks/quantize.py --dim 1000000 --clients 100
"""

from __future__ import annotations

import argparse
import json
import secrets
import time

import numpy as np

from protocols.secagg.packing import pack_words, unpack_words
from protocols.secagg.quantize import QuantizationPlan, dequantize_sum, quantize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=1_000_000, help="values per update (d)")
    parser.add_argument("--clients", type=int, default=100, help="uploads summed (n)")
    parser.add_argument("--clip", type=float, default=8.0, help="clip range c")
    parser.add_argument("--levels", type=int, default=2**22, help="quantisation levels Q")
    parser.add_argument("--max-weight", type=int, default=1, help="integer weight bound W")
    args = parser.parse_args()

    plan = QuantizationPlan(
        clip_range=args.clip, levels=args.levels, bucket_size=args.clients, max_weight=args.max_weight
    )
    rng = np.random.default_rng(secrets.randbits(128))
    update = rng.standard_normal(args.dim, dtype=np.float32)

    start = time.perf_counter()
    blob = pack_words(quantize(update, plan, rng), plan.bits)
    quantize_pack_s = time.perf_counter() - start

    # Distinct uploads for the sum (untimed): shifted copies of the client's words.
    words = unpack_words(blob, plan.bits, args.dim)
    blobs = [pack_words(np.roll(words, k), plan.bits) for k in range(args.clients)]

    start = time.perf_counter()
    acc = np.zeros(args.dim, dtype=np.uint64)
    for data in blobs:  # one unpack and one uint64 add per client; reduce mod 2^b once at the end
        acc += unpack_words(data, plan.bits, args.dim)
    total = acc & np.uint64(plan.modulus - 1)
    unpack_sum_s = time.perf_counter() - start
    dequantize_sum(total, plan, args.clients, args.clients)  # checks the sum did not wrap

    print(json.dumps({
        "dim": args.dim,
        "clients": args.clients,
        "bits": plan.bits,
        "quantize_pack_s": round(quantize_pack_s, 4),
        "unpack_modsum_s": round(unpack_sum_s, 4),
        "packed_bytes_per_client": len(blob),
        "float32_bytes_per_client": 4 * args.dim,
        "ratio_to_float32": round(len(blob) / (4 * args.dim), 4),
    }))


if __name__ == "__main__":
    main()
