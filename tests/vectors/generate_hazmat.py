"""Write tests/vectors/hazmat.json: known answers of protocols._hazmat for fixed inputs.

Every input is fixed here (keys, nonces, Shamir coefficients), so the file is reproducible; the
outputs come from the library. tests/test_hazmat.py checks the library still produces them and
recomputes them with the independent implementations of tests/vectors/reference_hazmat.py (pure
Python X25519, HKDF, ChaCha20 and Lagrange; AES-GCM with cryptography's AESGCM called directly).
The file holds invalid cases too: each names the exception a parser or a check must raise.

Run from the repository root:  PYTHONPATH=. python tests/vectors/generate_hazmat.py
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from protocols._hazmat import aead, keys, masking, prg, shamir

OUT = Path(__file__).resolve().parent / "hazmat.json"


def fixed(label: str, n: int = 32) -> bytes:
    """Deterministic test bytes (SHA-256 of a label, repeated): for vectors only, never keys in use."""
    out = b""
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{label}/{counter}".encode()).digest()
        counter += 1
    return out[:n]


def x25519_vectors() -> list[dict[str, str]]:
    rows = []
    for label in ("pair-0", "pair-1"):
        a = keys.load_private_key(fixed(label + "/a"))
        b = keys.load_private_key(fixed(label + "/b"))
        rows.append({
            "private_a": fixed(label + "/a").hex(),
            "private_b": fixed(label + "/b").hex(),
            "public_a": keys.public_key_to_bytes(a.public_key()).hex(),
            "public_b": keys.public_key_to_bytes(b.public_key()).hex(),
            "shared": keys.agree(a, b.public_key()).hex(),
        })
    return rows


def hkdf_vectors() -> list[dict[str, Any]]:
    rows = []
    instances = [("run-a", 0, 0), ("run-a", 1, 0), ("run-a", 0, 1), ("rün-b", 4294967295, 7)]
    for purpose in keys.PURPOSES:
        for run_id, rnd, bucket in instances:
            secret = fixed("ikm")
            rows.append({
                "secret": secret.hex(), "purpose": purpose.decode(), "run_id": run_id, "round": rnd,
                "bucket": bucket, "salt": keys.instance_salt(run_id=run_id, round=rnd, bucket=bucket).hex(),
                "key": keys.derive_key(secret, purpose=purpose, run_id=run_id, round=rnd, bucket=bucket).hex(),
            })
    return rows


def prg_vectors() -> list[dict[str, Any]]:
    rows = []
    for bits, count in ((1, 40), (8, 40), (12, 40), (20, 40), (32, 40), (33, 20), (64, 20), (32, 1)):
        key = fixed(f"prg/{bits}")
        rows.append({"key": key.hex(), "bits": bits, "count": count,
                     "words": [int(w) for w in prg.mask_words(key, count, bits=bits)]})
    return rows


def _route(**changes: Any) -> dict[str, Any]:
    route = {"run_id": "run-a", "round": 3, "bucket": 1, "sender": "client-7", "receiver": "client-9"}
    route.update(changes)
    return route


def aead_vectors() -> dict[str, list[dict[str, Any]]]:
    key = fixed("aead/key")
    nonce = fixed("aead/nonce", aead.NONCE_BYTES)
    plaintext = fixed("aead/plaintext", 71)  # the size of a two-secret share
    route = _route()
    sealed = aead._seal(key, nonce, plaintext, aead.ShareRoute(**route))
    valid = [{"key": key.hex(), "nonce": nonce.hex(), "route": route, "plaintext": plaintext.hex(),
              "aad": aead.ShareRoute(**route).associated_data().hex(), "ciphertext": sealed.hex()}]
    flipped = bytearray(sealed)
    flipped[20] ^= 0x01
    tag_flipped = bytearray(sealed)
    tag_flipped[-1] ^= 0x80
    invalid = [
        {"why": "flipped ciphertext bit", "ciphertext": bytes(flipped).hex(), "route": route, "error": "InvalidShare"},
        {"why": "flipped tag bit", "ciphertext": bytes(tag_flipped).hex(), "route": route, "error": "InvalidShare"},
        {"why": "another round", "ciphertext": sealed.hex(), "route": _route(round=4), "error": "InvalidShare"},
        {"why": "another bucket", "ciphertext": sealed.hex(), "route": _route(bucket=0), "error": "InvalidShare"},
        {"why": "another run", "ciphertext": sealed.hex(), "route": _route(run_id="run-b"), "error": "InvalidShare"},
        {"why": "another sender", "ciphertext": sealed.hex(), "route": _route(sender="client-8"), "error": "InvalidShare"},
        {"why": "another receiver", "ciphertext": sealed.hex(), "route": _route(receiver="client-8"),
         "error": "InvalidShare"},
        {"why": "sender and receiver swapped", "ciphertext": sealed.hex(),
         "route": _route(sender="client-9", receiver="client-7"), "error": "InvalidShare"},
        {"why": "wrong version byte", "ciphertext": (b"\x80" + sealed[1:]).hex(), "route": route,
         "error": "MalformedMessage"},
        {"why": "truncated below nonce and tag", "ciphertext": sealed[:28].hex(), "route": route,
         "error": "MalformedMessage"},
    ]
    for row in invalid:
        row["key"] = key.hex()
    return {"valid": valid, "invalid": invalid}


def shamir_vectors() -> dict[str, list[dict[str, Any]]]:
    valid = []
    for threshold, count, n_secrets in ((1, 1, 1), (2, 3, 1), (3, 5, 2), (5, 7, 2)):
        secrets_ = [fixed(f"shamir/{threshold}/{count}/secret/{i}") for i in range(n_secrets)]
        if n_secrets == 2:
            secrets_[1] = b"\xff" * 32  # the largest secret
        rows = [[int.from_bytes(s, "big") for s in secrets_]]
        for degree in range(1, threshold):
            rows.append([int.from_bytes(fixed(f"shamir/coef/{degree}/{i}"), "big") % shamir.PRIME
                         for i in range(n_secrets)])
        scheme = shamir.ShamirScheme(threshold, count)
        shares = scheme._evaluate(rows)
        valid.append({"threshold": threshold, "shares": count, "secrets": [s.hex() for s in secrets_],
                      "coefficients": [[hex(c) for c in row] for row in rows[1:]],
                      "share_bytes": [s.to_bytes().hex() for s in shares]})
    good = [bytes.fromhex(h) for h in valid[2]["share_bytes"]]  # the 3-of-5 case
    one = good[0]
    invalid_sets = [
        {"why": "too few shares", "threshold": 3, "share_bytes": [s.hex() for s in good[:2]], "error": "InvalidShare"},
        {"why": "duplicate x", "threshold": 3, "share_bytes": [good[0].hex(), good[1].hex(), good[0].hex()],
         "error": "InvalidShare"},
        {"why": "threshold differs from the scheme's", "threshold": 2, "share_bytes": [s.hex() for s in good[:3]],
         "error": "InvalidShare"},
        {"why": "a fourth share off the polynomial", "threshold": 3,
         "share_bytes": [s.hex() for s in good[:3]] + [_bump_value(good[3]).hex()], "error": "InvalidShare"},
    ]
    invalid_bytes = [
        {"why": "wrong version byte", "data": (b"\x80" + one[1:]).hex(), "error": "MalformedMessage"},
        {"why": "one byte short", "data": one[:-1].hex(), "error": "MalformedMessage"},
        {"why": "one byte long", "data": (one + b"\x00").hex(), "error": "MalformedMessage"},
        {"why": "header only", "data": one[:5].hex(), "error": "MalformedMessage"},
        {"why": "x = 0", "data": (one[:2] + b"\x00\x00" + one[4:]).hex(), "error": "MalformedMessage"},
        {"why": "threshold 0", "data": (one[:1] + b"\x00" + one[2:]).hex(), "error": "MalformedMessage"},
        {"why": "value = p", "data": (one[:5] + shamir.PRIME.to_bytes(33, "big") + one[38:]).hex(),
         "error": "MalformedMessage"},
    ]
    return {"valid": valid, "invalid_sets": invalid_sets, "invalid_bytes": invalid_bytes}


def _bump_value(data: bytes) -> bytes:
    share = shamir.Share.from_bytes(data)
    return shamir.Share(share.x, share.threshold,
                        ((share.values[0] + 1) % shamir.PRIME, *share.values[1:])).to_bytes()


def public_key_vectors() -> dict[str, list[dict[str, str]]]:
    good = keys.public_key_to_bytes(X25519PublicKey.from_public_bytes(fixed("pk")))
    return {"invalid": [
        {"why": "wrong version byte", "data": (b"\x81" + good[1:]).hex(), "error": "MalformedMessage"},
        {"why": "raw key without version", "data": good[1:].hex(), "error": "MalformedMessage"},
        {"why": "one byte long", "data": (good + b"\x00").hex(), "error": "MalformedMessage"},
        {"why": "low-order point (u = 0): agreement refuses it", "data": (good[:1] + bytes(32)).hex(),
         "error": "InvalidShare"},
    ]}


def masking_vectors() -> dict[str, Any]:
    """The oracle of docs algorithms.md section 4, recomputed with the library."""
    x = {1: 5, 2: 7, 3: 9}
    m = {(1, 2): 10, (1, 3): 20, (2, 3): 30}
    y = {}
    for me in x:
        pair = {v: [m[min(me, v), max(me, v)]] for v in x if v != me}
        y[me] = int(masking.add_masks([x[me]], bits=8, me=me, pairwise=pair)[0])
    total = int(masking.modular_sum([[y[1]], [y[2]], [y[3]]], bits=8)[0])
    partial = masking.modular_sum([[y[1]], [y[2]]], bits=8)
    partial = masking.add_masks(partial, bits=8, me=1, pairwise={3: [20]}, sign=-1)
    partial = masking.add_masks(partial, bits=8, me=2, pairwise={3: [30]}, sign=-1)
    return {"bits": 8, "x": [5, 7, 9], "m12": 10, "m13": 20, "m23": 30, "y": [y[1], y[2], y[3]],
            "sum": total, "client_3_drops_sum": int(partial[0])}


def main() -> None:
    data = {
        "comment": "generated by tests/vectors/generate_hazmat.py; do not edit by hand",
        "x25519": x25519_vectors(), "hkdf": hkdf_vectors(), "prg": prg_vectors(), "aead": aead_vectors(),
        "shamir": shamir_vectors(), "public_key": public_key_vectors(), "masking": masking_vectors(),
    }
    OUT.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
