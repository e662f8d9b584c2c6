"""protocols._hazmat: known answers (checked independently), properties, refusals and a benchmark.

The vectors in tests/vectors/hazmat.json come from tests/vectors/generate_hazmat.py; each is
checked twice, against the library and against tests/vectors/reference_hazmat.py (pure Python
from the RFCs, sharing no code with the library).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import errors
from protocols._hazmat import keys, prg, shamir
from protocols._hazmat import (
    INFO_PAIRWISE_MASK, INFO_SELF_MASK, ShamirScheme, Share, ShareRoute, add_masks, agree, decrypt_share,
    derive_key, encrypt_share, generate_private_key, load_private_key, mask_words, modular_sum,
    private_key_bytes, public_key_from_bytes, public_key_to_bytes,
)

ROOT = Path(__file__).resolve().parent.parent
VECTORS = json.loads((ROOT / "tests" / "vectors" / "hazmat.json").read_text(encoding="utf-8"))
_spec = importlib.util.spec_from_file_location("reference_hazmat", ROOT / "tests" / "vectors" / "reference_hazmat.py")
assert _spec is not None and _spec.loader is not None
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

ERRORS = {"InvalidShare": errors.InvalidShare, "MalformedMessage": errors.MalformedMessage}
SETTINGS = settings(max_examples=40, deadline=None)


# ---------------------------------------------------------------- known answers


@pytest.mark.parametrize("row", VECTORS["x25519"])
def test_x25519_vectors(row: dict[str, str]) -> None:
    a, b = bytes.fromhex(row["private_a"]), bytes.fromhex(row["private_b"])
    pub_b = public_key_from_bytes(bytes.fromhex(row["public_b"]))
    assert public_key_to_bytes(load_private_key(a).public_key()).hex() == row["public_a"]
    assert agree(load_private_key(a), pub_b).hex() == row["shared"]
    # independent: RFC 7748 ladder in pure Python
    assert "82" + ref.x25519_public(a).hex() == row["public_a"]
    assert ref.x25519(a, ref.x25519_public(b)).hex() == row["shared"]


@pytest.mark.parametrize("row", VECTORS["hkdf"])
def test_hkdf_vectors(row: dict[str, Any]) -> None:
    secret, purpose = bytes.fromhex(row["secret"]), row["purpose"].encode()
    inst = {"run_id": row["run_id"], "round": row["round"], "bucket": row["bucket"]}
    assert keys.instance_salt(**inst).hex() == row["salt"]
    assert derive_key(secret, purpose=purpose, **inst).hex() == row["key"]
    salt = ref.instance_salt(row["run_id"], row["round"], row["bucket"])
    assert salt.hex() == row["salt"]
    assert ref.hkdf_sha256(secret, salt=salt, info=purpose).hex() == row["key"]


def test_hkdf_domain_separation() -> None:
    """Every (purpose, run, round, bucket) in the vectors gives a different key from the same secret."""
    derived = [row["key"] for row in VECTORS["hkdf"]]
    assert len(set(derived)) == len(derived) == 12


@pytest.mark.parametrize("row", VECTORS["prg"], ids=lambda r: f"b{r['bits']}x{r['count']}")
def test_prg_vectors(row: dict[str, Any]) -> None:
    key = bytes.fromhex(row["key"])
    words = mask_words(key, row["count"], bits=row["bits"])
    assert words.dtype == prg.word_dtype(row["bits"]) and words.tolist() == row["words"]
    assert ref.mask_words(key, row["count"], row["bits"]) == row["words"]  # RFC 8439 in pure Python
    width = words.dtype.itemsize  # and cryptography's raw ChaCha20, read word by word
    raw = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(row["count"] * width))
    expected = [int.from_bytes(raw[i:i + width], "little") % (1 << row["bits"]) for i in range(0, len(raw), width)]
    assert expected == row["words"]


def _route(fields: dict[str, Any]) -> ShareRoute:
    return ShareRoute(**fields)


@pytest.mark.parametrize("row", VECTORS["aead"]["valid"])
def test_aead_vectors(row: dict[str, Any]) -> None:
    key, sealed = bytes.fromhex(row["key"]), bytes.fromhex(row["ciphertext"])
    route = _route(row["route"])
    assert route.associated_data().hex() == row["aad"] == ref.share_aad(row["route"]).hex()
    assert decrypt_share(key, sealed, route=route).hex() == row["plaintext"]
    nonce = bytes.fromhex(row["nonce"])
    assert sealed == b"\x83" + nonce + AESGCM(key).encrypt(nonce, bytes.fromhex(row["plaintext"]),
                                                         ref.share_aad(row["route"]))


@pytest.mark.parametrize("row", VECTORS["aead"]["invalid"], ids=lambda r: r["why"])
def test_aead_invalid_vectors(row: dict[str, Any]) -> None:
    with pytest.raises(ERRORS[row["error"]]):
        decrypt_share(bytes.fromhex(row["key"]), bytes.fromhex(row["ciphertext"]), route=_route(row["route"]))


@pytest.mark.parametrize("row", VECTORS["shamir"]["valid"], ids=lambda r: f"{r['threshold']}of{r['shares']}")
def test_shamir_vectors(row: dict[str, Any]) -> None:
    t, k = row["threshold"], row["shares"]
    secrets_ = [bytes.fromhex(s) for s in row["secrets"]]
    coefficients = [[int(s, 16) for s in secrets_row] for secrets_row in row["coefficients"]]
    scheme = ShamirScheme(t, k)
    made = scheme._evaluate([[int.from_bytes(s, "big") for s in secrets_], *coefficients])
    assert [s.to_bytes().hex() for s in made] == row["share_bytes"]
    shares = [Share.from_bytes(bytes.fromhex(h)) for h in row["share_bytes"]]
    parsed = [ref.parse_share(bytes.fromhex(h)) for h in row["share_bytes"]]
    for subset in itertools.combinations(range(k), t):
        assert scheme.combine([shares[i] for i in subset]) == secrets_
        for index, secret in enumerate(secrets_):  # independent Lagrange at 0
            points = [(parsed[i][1], parsed[i][2][index]) for i in subset]
            assert ref.lagrange_at_zero(points) == int.from_bytes(secret, "big")


@pytest.mark.parametrize("row", VECTORS["shamir"]["invalid_sets"], ids=lambda r: r["why"])
def test_shamir_invalid_sets(row: dict[str, Any]) -> None:
    shares = [Share.from_bytes(bytes.fromhex(h)) for h in row["share_bytes"]]
    with pytest.raises(ERRORS[row["error"]]):
        shamir.combine(shares, threshold=row["threshold"])


@pytest.mark.parametrize("row", VECTORS["shamir"]["invalid_bytes"], ids=lambda r: r["why"])
def test_shamir_invalid_bytes(row: dict[str, Any]) -> None:
    with pytest.raises(ERRORS[row["error"]], match="share"):
        Share.from_bytes(bytes.fromhex(row["data"]))


@pytest.mark.parametrize("row", VECTORS["public_key"]["invalid"], ids=lambda r: r["why"])
def test_public_key_invalid(row: dict[str, Any]) -> None:
    with pytest.raises(ERRORS[row["error"]]):
        agree(generate_private_key(), public_key_from_bytes(bytes.fromhex(row["data"])))


def test_masking_oracle() -> None:
    """algorithms.md section 4: R = 256, x = (5, 7, 9), m12 = 10, m13 = 20, m23 = 30."""
    oracle = VECTORS["masking"]
    assert (oracle["y"], oracle["sum"], oracle["client_3_drops_sum"]) == ([35, 27, 215], 21, 12)
    m = {(1, 2): 10, (1, 3): 20, (2, 3): 30}
    y = [add_masks([x], bits=8, me=u, pairwise={v: [m[min(u, v), max(u, v)]] for v in (1, 2, 3) if v != u})
         for u, x in zip((1, 2, 3), (5, 7, 9))]
    assert [int(v[0]) for v in y] == [35, 27, 215]
    assert modular_sum(y, bits=8).tolist() == [21]
    survivors = modular_sum(y[:2], bits=8)
    unmasked = add_masks(add_masks(survivors, bits=8, me=1, pairwise={3: [20]}, sign=-1),
                         bits=8, me=2, pairwise={3: [30]}, sign=-1)
    assert unmasked.tolist() == [12]


# ---------------------------------------------------------------- properties


@SETTINGS
@given(k=st.integers(1, 7), data=st.data(), n_secrets=st.integers(1, 2))
def test_shamir_every_t_subset_reconstructs(k: int, data: st.DataObject, n_secrets: int) -> None:
    t = data.draw(st.integers(1, k), label="t")
    secret_list = data.draw(st.lists(st.binary(min_size=32, max_size=32), min_size=n_secrets, max_size=n_secrets))
    scheme = ShamirScheme(t, k)
    shares = [Share.from_bytes(s.to_bytes()) for s in scheme.split(secret_list)]
    assert sorted(s.x for s in shares) == list(range(1, k + 1))
    for subset in itertools.combinations(shares, t):
        assert scheme.combine(list(subset)) == secret_list
        assert scheme.combine(list(reversed(subset))) == secret_list
    assert scheme.combine(shares) == secret_list  # extra shares are checked, and agree
    if t > 1:
        for subset in itertools.combinations(shares, t - 1):
            with pytest.raises(errors.InvalidShare, match="at least"):
                scheme.combine(list(subset))
            guess = ref.lagrange_at_zero([(s.x, s.values[0]) for s in subset])
            assert guess != int.from_bytes(secret_list[0], "big")  # fails with probability ~ 2**-256


def test_shamir_refuses_bad_parameters_at_construction_and_on_every_call() -> None:
    for t, k in ((0, 3), (4, 3), (-1, 3), (1, 0), (True, 3), (2, 70000)):
        with pytest.raises((ValueError, TypeError)):
            ShamirScheme(t, k)
    scheme = ShamirScheme(2, 3)
    object.__setattr__(scheme, "threshold", 5)  # a mutated scheme is refused, not trusted
    with pytest.raises(ValueError, match="threshold"):
        scheme.split([bytes(32)])
    with pytest.raises(ValueError, match="threshold"):
        scheme.combine([])
    with pytest.raises(TypeError):
        ShamirScheme(2, 3).split(bytes(32))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="32 bytes"):
        ShamirScheme(2, 3).split([bytes(31)])


def test_shamir_select_reveals_one_secret() -> None:
    seed, mask_key = bytes(range(32)), bytes(range(32, 64))
    shares = ShamirScheme(2, 3).split([seed, mask_key])
    assert shamir.combine([s.select(1) for s in shares[1:]], threshold=2) == [mask_key]


@SETTINGS
@given(a=st.binary(min_size=32, max_size=32), b=st.binary(min_size=32, max_size=32))
def test_x25519_agreement_is_symmetric(a: bytes, b: bytes) -> None:
    ka, kb = load_private_key(a), load_private_key(b)
    pa = public_key_from_bytes(public_key_to_bytes(ka.public_key()))
    pb = public_key_from_bytes(public_key_to_bytes(kb.public_key()))
    assert agree(ka, pb) == agree(kb, pa)
    assert private_key_bytes(ka) == a


_ids = st.text(alphabet="abcxyz-0123456789é", min_size=1, max_size=12)


@SETTINGS
@given(plaintext=st.binary(max_size=200), run_id=_ids, rnd=st.integers(0, 2**32 - 1),
       bucket=st.integers(0, 50), sender=_ids, receiver=_ids, data=st.data())
def test_aead_round_trip_and_tamper_refusal(
    plaintext: bytes, run_id: str, rnd: int, bucket: int, sender: str, receiver: str, data: st.DataObject
) -> None:
    if sender == receiver:
        receiver += "'"
    key = derive_key(bytes(32), purpose=keys.INFO_SHARE_ENCRYPTION, run_id=run_id, round=rnd, bucket=bucket)
    route = ShareRoute(run_id, rnd, bucket, sender, receiver)
    sealed = encrypt_share(key, plaintext, route=route)
    assert decrypt_share(key, sealed, route=route) == plaintext
    assert encrypt_share(key, plaintext, route=route) != sealed  # fresh random nonce
    index = data.draw(st.integers(0, len(sealed) - 1), label="byte")
    flipped = bytearray(sealed)
    flipped[index] ^= data.draw(st.integers(1, 255), label="xor")
    with pytest.raises(errors.MalformedMessage if index == 0 else errors.InvalidShare):
        decrypt_share(key, bytes(flipped), route=route)
    for wrong in (ShareRoute(run_id, rnd ^ 1, bucket, sender, receiver),
                  ShareRoute(run_id, rnd, bucket + 1, sender, receiver),
                  ShareRoute(run_id + "x", rnd, bucket, sender, receiver),
                  ShareRoute(run_id, rnd, bucket, sender + "x", receiver),
                  ShareRoute(run_id, rnd, bucket, sender, receiver + "x"),
                  ShareRoute(run_id, rnd, bucket, receiver, sender)):
        with pytest.raises(errors.InvalidShare, match="does not authenticate"):
            decrypt_share(key, sealed, route=wrong)


@SETTINGS
@given(key=st.binary(min_size=32, max_size=32), bits=st.integers(1, 64), count=st.integers(0, 300))
def test_prg_is_reproducible_and_in_range(key: bytes, bits: int, count: int) -> None:
    words = mask_words(key, count, bits=bits)
    assert words.shape == (count,) and np.array_equal(words, mask_words(key, count, bits=bits))
    assert all(int(w) < 1 << bits for w in words)
    longer = mask_words(key, count + 7, bits=bits)
    assert np.array_equal(longer[:count], words)  # a prefix: one keystream, read in order


def test_prg_bits_look_uniform() -> None:
    """Cheap check: each of the 32 bit positions of 2**20 words is set about half the time."""
    words = mask_words(bytes(range(32)), 2**20, bits=32)
    ones = np.unpackbits(words.view(np.uint8)).reshape(-1, 32).sum(axis=0)  # per bit position
    n = words.size
    assert np.all(np.abs(ones - n / 2) < 6 * np.sqrt(n / 4))
    b20 = mask_words(bytes(32), 2**16, bits=20)
    assert b20.max() < 2**20 and b20.max() > 2**20 - 2**8  # the top of the range occurs
    assert not np.array_equal(mask_words(bytes(32), 8, bits=32), mask_words(b"\x01" + bytes(31), 8, bits=32))


def test_prg_refuses_bad_arguments() -> None:
    for bad_bits in (0, 65, True, 8.0):
        with pytest.raises(ValueError, match="bits"):
            mask_words(bytes(32), 4, bits=bad_bits)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="256-bit"):
        mask_words(bytes(16), 4, bits=8)
    with pytest.raises(ValueError, match="count"):
        mask_words(bytes(32), -1, bits=8)


@SETTINGS
@given(n=st.integers(2, 6), bits=st.integers(1, 64), d=st.integers(1, 20), data=st.data())
def test_pairwise_masks_cancel_and_dropouts_unmask(n: int, bits: int, d: int, data: st.DataObject) -> None:
    clients = list(range(n))
    x = {u: mask_words(bytes([u + 1]) * 32, d, bits=bits) for u in clients}
    m = {(u, v): mask_words(bytes([u, v]) * 16, d, bits=bits) for u, v in itertools.combinations(clients, 2)}
    def pair(u: int, v: int) -> Any:
        return m[min(u, v), max(u, v)]
    y = {u: add_masks(x[u], bits=bits, me=u, pairwise={v: pair(u, v) for v in clients if v != u}) for u in clients}
    assert np.array_equal(modular_sum(y.values(), bits=bits), modular_sum(x.values(), bits=bits))
    dropped = set(data.draw(st.sets(st.sampled_from(clients), max_size=n - 1), label="dropped"))
    alive = [u for u in clients if u not in dropped]
    total = modular_sum([y[u] for u in alive], bits=bits)
    for u in alive:  # remove each survivor's masks with the dropped clients
        total = add_masks(total, bits=bits, me=u, pairwise={v: pair(u, v) for v in dropped}, sign=-1)
    assert np.array_equal(total, modular_sum([x[u] for u in alive], bits=bits))


def test_add_masks_refuses_out_of_range_and_self_pairs() -> None:
    with pytest.raises(ValueError, match=r"\[0, 2\*\*8\)"):
        add_masks([256], bits=8)
    with pytest.raises(ValueError, match="itself"):
        add_masks([1], bits=8, me=2, pairwise={2: [3]})
    with pytest.raises(ValueError, match="integers"):
        add_masks([1.5], bits=8)


def test_building_blocks_compose_into_one_masked_sum_with_a_dropout() -> None:
    """Not SecAgg+ (no stages, no server): the hazmat calls it will make, end to end, 3 clients."""
    inst = {"run_id": "run", "round": 2, "bucket": 0}
    bits, d, ids = 20, 1000, ["a", "b", "c"]
    mask_sk = {u: generate_private_key() for u in ids}
    seed = {u: derive_key(generate_private_key().private_bytes_raw(), purpose=INFO_SELF_MASK, **inst) for u in ids}
    x = {u: mask_words(bytes(32), d, bits=bits) // (i + 2) for i, u in enumerate(ids)}

    def pair_mask(u: str, v: str, sk: Any) -> Any:
        shared = agree(sk, mask_sk[v].public_key())
        return mask_words(derive_key(shared, purpose=INFO_PAIRWISE_MASK, **inst), d, bits=bits)

    scheme = ShamirScheme(2, 3)
    shares = {u: scheme.split([seed[u], private_key_bytes(mask_sk[u])]) for u in ids}
    y = {u: add_masks(x[u], bits=bits, me=u, self_mask=mask_words(seed[u], d, bits=bits),
                      pairwise={v: pair_mask(u, v, mask_sk[u]) for v in ids if v != u}) for u in ids}
    total = modular_sum([y["a"], y["b"]], bits=bits)  # "c" dropped after masking
    for u in ("a", "b"):  # survivors: the self-mask seed (share 0) from two shares
        (s,) = shamir.combine([shares[u][i].select(0) for i in (0, 1)], threshold=2)
        total = add_masks(total, bits=bits, self_mask=mask_words(s, d, bits=bits), sign=-1)
    (c_sk,) = shamir.combine([shares["c"][i].select(1) for i in (0, 1)], threshold=2)  # dropped: mask key
    c_key = load_private_key(c_sk)
    for u in ("a", "b"):
        total = add_masks(total, bits=bits, me=u, pairwise={"c": pair_mask("c", u, c_key)}, sign=-1)
    assert np.array_equal(total, modular_sum([x["a"], x["b"]], bits=bits))


# ---------------------------------------------------------------- hygiene and speed


def test_no_seeded_randomness_on_the_hazmat_path() -> None:
    source = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "protocols" / "_hazmat").glob("*.py"))
    assert not re.search(r"^\s*(import random|from random )|np\.random|default_rng|seed\s*=", source, re.MULTILINE)
    assert "from __future__ import annotations" in source


def test_hazmat_benchmark_prints_prg_throughput(capsys: pytest.CaptureFixture[str]) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "hazmat.py"), "--mb", "32", "--repeats", "2"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    prg_rows = [r for r in records if r["bench"] == "hazmat_prg"]
    assert {r["bits"] for r in prg_rows} == {8, 20, 32, 64} and all(r["gb_per_s"] > 0 for r in prg_rows)
    with capsys.disabled():
        print("\nmask PRG throughput (one core):", ", ".join(f"b={r['bits']}: {r['gb_per_s']} GB/s" for r in prg_rows))
