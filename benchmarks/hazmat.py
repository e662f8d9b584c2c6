"""Throughput of the secure-aggregation hazmat layer on one core.

Prints one JSON line per measurement: the mask PRG (ChaCha20 keystream to b-bit words) in GB/s of
mask produced, for several b; masking a vector with ``--peers`` pairwise masks; and Shamir
splitting and reconstruction of the two 32-byte secrets a client shares per round.

Run:  PYTHONPATH=. python benchmarks/hazmat.py --mb 256
"""

from __future__ import annotations

import argparse
import json
import secrets
import time

from protocols._hazmat import ShamirScheme, add_masks, mask_words


def _best(fn: object, repeats: int) -> float:
    assert callable(fn)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=256.0, help="mask size in MB (10**6 bytes)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    parser.add_argument("--peers", type=int, default=8, help="pairwise masks per client in the masking run")
    parser.add_argument("--k", type=int, default=16, help="Shamir shares (neighbours)")
    args = parser.parse_args()

    key = secrets.token_bytes(32)
    nbytes = int(args.mb * 1e6)
    for bits in (8, 20, 32, 64):
        width = 1 if bits <= 8 else 4 if bits <= 32 else 8
        count = nbytes // width
        seconds = _best(lambda c=count, b=bits: mask_words(key, c, bits=b), args.repeats)
        print(json.dumps({"bench": "hazmat_prg", "bits": bits, "mb": round(count * width / 1e6, 3),
                          "seconds": round(seconds, 4), "gb_per_s": round(count * width / seconds / 1e9, 3)}))

    count = nbytes // 4 // max(args.peers, 1)
    values = mask_words(key, count, bits=20)
    masks = {peer: mask_words(secrets.token_bytes(32), count, bits=20) for peer in range(1, args.peers + 1)}
    seconds = _best(lambda: add_masks(values, bits=20, me=0, pairwise=masks), args.repeats)
    print(json.dumps({"bench": "hazmat_add_masks", "bits": 20, "words": count, "peers": args.peers,
                      "seconds": round(seconds, 4), "mwords_per_s": round(count / seconds / 1e6, 1)}))

    scheme = ShamirScheme(threshold=args.k // 2 + 1, shares=args.k)
    two = [secrets.token_bytes(32), secrets.token_bytes(32)]
    shares = scheme.split(two)
    split_s = _best(lambda: scheme.split(two), args.repeats)
    combine_s = _best(lambda: scheme.combine(shares[: scheme.threshold]), args.repeats)
    print(json.dumps({"bench": "hazmat_shamir", "k": args.k, "t": scheme.threshold, "secrets": 2,
                      "split_ms": round(split_s * 1e3, 3), "combine_ms": round(combine_s * 1e3, 3)}))


if __name__ == "__main__":
    main()
