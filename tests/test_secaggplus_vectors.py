"""SecAgg+ masked inputs and unmasked sums: known answers (checked independently), the masking oracle,
and properties of the fast mask path (chunks, threads, keystream offsets, packed sums).

tests/vectors/secaggplus_masked.json comes from tests/vectors/generate_secaggplus.py. Each case is
checked against the library (`protocols.secagg.secaggplus_masks`, the packing) and recomputed in
pure Python with tests/vectors/reference_hazmat.py (RFC 7748 X25519, RFC 5869 HKDF, RFC 8439
ChaCha20), which shares no code with the library.
"""

from __future__ import annotations

import importlib.util
import json
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols._hazmat import (
    INFO_PAIRWISE_MASK,
    INFO_SELF_MASK,
    add_masks,
    agree,
    derive_key,
    generate_private_key,
    load_private_key,
    mask_words,
    masking,
    pairwise_sign,
    prg,
    public_key_to_bytes,
)
from protocols.secagg.packing import PackedSum, pack_words
from protocols.secagg.secaggplus_masks import (
    DroppedClient,
    mask_input,
    sum_words,
    unmask_sum,
)

ROOT = Path(__file__).resolve().parent.parent
VECTORS = json.loads((ROOT / "tests" / "vectors" / "secaggplus_masked.json").read_text(encoding="utf-8"))
CASES = VECTORS["cases"]
_spec = importlib.util.spec_from_file_location("reference_hazmat", ROOT / "tests" / "vectors" / "reference_hazmat.py")
assert _spec is not None and _spec.loader is not None
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)
SETTINGS = settings(max_examples=30, deadline=None)


def _key(hex_key: str) -> Any:
    return load_private_key(bytes.fromhex(hex_key))


def _library_mask(case: dict[str, Any], c: str, *, private: str | None = None, rnd: int | None = None,
                  threads: int = 1) -> list[int]:
    me = case["clients"][c]
    publics = {v: _key(case["clients"][v]["mask_private_key"]).public_key() for v in me["neighbours"]}
    words = mask_input(
        me["values"], bits=case["bits"], me=c, self_seed=bytes.fromhex(me["self_seed"]),
        mask_private_key=_key(private or me["mask_private_key"]), neighbour_mask_publics=publics,
        run_id=case["run_id"], round=case["round"] if rnd is None else rnd, bucket=case["bucket"], threads=threads,
    )
    return [int(w) for w in words]


def _library_unmask(case: dict[str, Any], masked: dict[str, list[int]], *, seeds: dict[str, str] | None = None,
                    with_dropped: bool = True) -> list[int]:
    clients, survivors = case["clients"], case["survivors"]
    seed_hex = {u: clients[u]["self_seed"] for u in survivors} | (seeds or {})
    dropped = {
        d: DroppedClient(_key(clients[d]["mask_private_key"]),
                         {v: _key(clients[v]["mask_private_key"]).public_key()
                          for v in clients[d]["neighbours"] if v in survivors})
        for d in case["dropped"]
    } if with_dropped else {}
    total = sum_words([masked[u] for u in survivors], bits=case["bits"])
    out = unmask_sum(total, bits=case["bits"], survivor_seeds={u: bytes.fromhex(s) for u, s in seed_hex.items()},
                     dropped=dropped, run_id=case["run_id"], round=case["round"], bucket=case["bucket"])
    return [int(w) for w in out]


# ---------------------------------------------------------------- the independent reference


def _ref_key(secret: bytes, info: str, case: dict[str, Any], rnd: int | None = None) -> bytes:
    salt = ref.instance_salt(case["run_id"], case["round"] if rnd is None else rnd, case["bucket"])
    return ref.hkdf_sha256(secret, salt=salt, info=info.encode())


def _ref_pair(case: dict[str, Any], private_hex: str, peer: str, rnd: int | None = None) -> list[int]:
    public = ref.x25519_public(bytes.fromhex(case["clients"][peer]["mask_private_key"]))
    shared = ref.x25519(bytes.fromhex(private_hex), public)
    return ref.mask_words(_ref_key(shared, VECTORS["info_pairwise_mask"], case, rnd), case["count"], case["bits"])


def _ref_mask(case: dict[str, Any], c: str, *, private: str | None = None, rnd: int | None = None) -> list[int]:
    """y_c = x_c + PRG(b_c) + sum over neighbours v of (+1 if c < v else -1) * PRG(pair(c, v)) mod 2^b."""
    me, modulus = case["clients"][c], 1 << case["bits"]
    seed_key = _ref_key(bytes.fromhex(me["self_seed"]), VECTORS["info_self_mask"], case, rnd)
    acc = [x + m for x, m in zip(me["values"], ref.mask_words(seed_key, case["count"], case["bits"]))]
    for v in me["neighbours"]:
        pair = _ref_pair(case, private or me["mask_private_key"], v, rnd)
        acc = [a + (p if c < v else -p) for a, p in zip(acc, pair)]
    return [a % modulus for a in acc]


def _ref_unmask(case: dict[str, Any], masked: dict[str, list[int]], *, seeds: dict[str, str] | None = None,
                with_dropped: bool = True) -> list[int]:
    clients, survivors, modulus = case["clients"], case["survivors"], 1 << case["bits"]
    acc = [sum(column) for column in zip(*(masked[u] for u in survivors))]
    for u in survivors:
        seed = bytes.fromhex((seeds or {}).get(u, clients[u]["self_seed"]))
        acc = [a - m for a, m in zip(acc, ref.mask_words(_ref_key(seed, VECTORS["info_self_mask"], case), case["count"],
                                                          case["bits"]))]
    for d in case["dropped"] if with_dropped else ():
        for v in (v for v in clients[d]["neighbours"] if v in survivors):
            pair = _ref_pair(case, clients[d]["mask_private_key"], v)
            acc = [a - (p if v < d else -p) for a, p in zip(acc, pair)]  # what v added, taken out
    return [a % modulus for a in acc]


# ---------------------------------------------------------------- known answers


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_masked_vectors_match_the_library_and_the_reference(case: dict[str, Any]) -> None:
    bits = case["bits"]
    for c, me in case["clients"].items():
        assert public_key_to_bytes(_key(me["mask_private_key"]).public_key()).hex() == me["mask_public_key"]
        assert "82" + ref.x25519_public(bytes.fromhex(me["mask_private_key"])).hex() == me["mask_public_key"]
        for threads in (1, 2):
            assert _library_mask(case, c, threads=threads) == me["masked"]
        assert _ref_mask(case, c) == me["masked"]
        assert pack_words(me["masked"], bits).hex() == me["packed"]  # the wire format of the upload


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_unmasked_sum_is_exact_and_matches_the_reference(case: dict[str, Any]) -> None:
    bits, survivors = case["bits"], case["survivors"]
    masked = {c: me["masked"] for c, me in case["clients"].items()}
    plain = [sum(column) % (1 << bits) for column in zip(*(case["clients"][u]["values"] for u in survivors))]
    assert case["sum"] == plain  # the masks cancel: exactly the survivors' inputs mod 2^b
    assert _library_unmask(case, masked) == case["sum"]
    assert _ref_unmask(case, masked) == case["sum"]
    packed = PackedSum(bits, case["count"])  # what the server does: sum the packed uploads
    packed.add_many([bytes.fromhex(case["clients"][u]["packed"]) for u in survivors], threads=2)
    assert packed.total().tolist() == sum_words([masked[u] for u in survivors], bits=bits).tolist()
    n = len(survivors)
    assert n <= case["sum"][-1] <= n * case["max_weight"]  # the weight word decodes


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_invalid_cases_give_a_different_vector_that_does_not_decode(case: dict[str, Any]) -> None:
    masked = {c: me["masked"] for c, me in case["clients"].items()}
    n = len(case["survivors"])
    names = [row["name"] for row in case["invalid"]]
    assert {"wrong-self-seed", "wrong-mask-key", "wrong-round"} <= set(names)
    assert ("dropped-masks-left-in" in names) == bool(case["dropped"])
    for row in case["invalid"]:
        if row["name"] == "wrong-self-seed":
            got = _library_unmask(case, masked, seeds=row["wrong_seed"])
            assert _ref_unmask(case, masked, seeds=row["wrong_seed"]) == got
        elif row["name"] == "dropped-masks-left-in":
            got = _library_unmask(case, masked, with_dropped=False)
            assert _ref_unmask(case, masked, with_dropped=False) == got
        else:
            c = row["client"]
            private, rnd = row.get("wrong_mask_private_key"), row.get("round")
            assert _library_mask(case, c, private=private, rnd=rnd) == row["masked"] != masked[c]
            assert _ref_mask(case, c, private=private, rnd=rnd) == row["masked"]
            got = _library_unmask(case, {**masked, c: row["masked"]})
        assert got == row["result"] != case["sum"], row["name"]
        assert not n <= got[-1] <= n * case["max_weight"], row["name"]  # it does not decode


def test_masking_oracle_of_algorithms_md_section_4() -> None:
    """R = 256, x = (5, 7, 9), m12 = 10, m13 = 20, m23 = 30 (the lower id adds): y = (35, 27, 215)."""
    oracle = VECTORS["oracle"]
    m = {tuple(int(i) for i in pair.split(",")): value for pair, value in oracle["m"].items()}
    ids, x = oracle["ids"], dict(zip(oracle["ids"], oracle["x"]))

    def mask(u: int, v: int) -> int:
        return m[min(u, v), max(u, v)]

    # the sign convention mask_input and unmask_sum use (pairwise_sign), on the oracle's explicit masks
    y = {u: (x[u] + sum(pairwise_sign(u, v) * mask(u, v) for v in ids if v != u)) % 256 for u in ids}
    assert [y[u] for u in ids] == oracle["y"] == [35, 27, 215]
    assert sum_words([[y[u]] for u in ids], bits=8).tolist() == [oracle["sum"]] == [21]
    survivors = sum_words([[y[1]], [y[2]]], bits=8)  # client 3 drops after masking
    unmasked = (int(survivors[0]) - sum(pairwise_sign(v, 3) * mask(v, 3) for v in (1, 2))) % 256
    assert unmasked == oracle["client_3_drops_sum"] == 12 == (5 + 7)
    hazmat = add_masks([5], bits=8, me=1, pairwise={2: [10], 3: [20]})  # and the hazmat helper agrees
    assert hazmat.tolist() == [35]


# ---------------------------------------------------------------- properties of the fast path


def _naive_mask(values: np.ndarray, bits: int, me: str, seed: bytes, key: Any, publics: dict[str, Any],
                inst: dict[str, Any]) -> np.ndarray:
    count = values.size
    pairwise = {v: mask_words(derive_key(agree(key, pub), purpose=INFO_PAIRWISE_MASK, **inst), count, bits=bits)
                for v, pub in publics.items()}
    self_mask = mask_words(derive_key(seed, purpose=INFO_SELF_MASK, **inst), count, bits=bits)
    return add_masks(values, bits=bits, me=me, pairwise=pairwise, self_mask=self_mask)  # type: ignore[type-var]


@SETTINGS
@given(bits=st.integers(1, 32), count=st.integers(0, 200), threads=st.integers(1, 3), n=st.integers(2, 5),
       data=st.data())
def test_fast_masks_equal_the_hazmat_building_blocks_across_chunks_and_threads(
    bits: int, count: int, threads: int, n: int, data: st.DataObject,
) -> None:
    saved = masking.CHUNK_WORDS, masking.THREAD_MIN_WORDS
    masking.CHUNK_WORDS, masking.THREAD_MIN_WORDS = 16, 0  # many chunks; threads even for tiny vectors
    try:
        inst = {"run_id": "run-p", "round": 2, "bucket": 1}
        ids = [f"c{i}" for i in range(n)]
        keys = {c: generate_private_key() for c in ids}
        seeds = {c: secrets.token_bytes(32) for c in ids}
        rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
        x = {c: rng.integers(0, 2**bits, size=count, dtype=np.uint64) for c in ids}
        y = {}
        for c in ids:
            publics = {v: keys[v].public_key() for v in ids if v != c}
            y[c] = mask_input(x[c], bits=bits, me=c, self_seed=seeds[c], mask_private_key=keys[c],
                              neighbour_mask_publics=publics, threads=threads, **inst)
            assert np.array_equal(y[c], _naive_mask(x[c], bits, c, seeds[c], keys[c], publics, inst))
        dropped = set(data.draw(st.sets(st.sampled_from(ids), max_size=n - 1), label="dropped"))
        alive = [c for c in ids if c not in dropped]
        total = unmask_sum(
            sum_words([y[c] for c in alive], bits=bits), bits=bits, threads=threads,
            survivor_seeds={c: seeds[c] for c in alive},
            dropped={d: DroppedClient(keys[d], {v: keys[v].public_key() for v in alive}) for d in dropped}, **inst,
        )
        expected = sum_words([x[c] for c in alive], bits=bits) if count else np.zeros(0)
        assert np.array_equal(total, expected)
    finally:
        masking.CHUNK_WORDS, masking.THREAD_MIN_WORDS = saved


@SETTINGS
@given(key=st.binary(min_size=32, max_size=32), blocks=st.integers(0, 5), extra=st.integers(0, 200))
def test_keystream_entered_at_a_block_offset_is_the_same_stream(key: bytes, blocks: int, extra: int) -> None:
    whole = prg.keystream(key, blocks * prg.BLOCK_BYTES + extra)
    out = bytearray(extra)
    prg.keystream_cipher(key, offset=blocks * prg.BLOCK_BYTES).update_into(bytes(extra), out)
    assert bytes(out) == bytes(whole[blocks * prg.BLOCK_BYTES:])


def test_keystream_cipher_refuses_bad_offsets_and_keys() -> None:
    for offset in (-64, 3, 65, True, prg.MAX_KEYSTREAM_BYTES):
        with pytest.raises(ValueError, match="offset"):
            prg.keystream_cipher(bytes(32), offset=offset)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="256-bit"):
        prg.keystream_cipher(bytes(31))


@SETTINGS
@given(bits=st.integers(1, 32), count=st.integers(0, 300), rows=st.integers(1, 6), threads=st.integers(1, 3),
       seed=st.integers(0, 2**32 - 1))
def test_packed_sum_equals_the_sum_of_unpacked_words(bits: int, count: int, rows: int, threads: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    words = [rng.integers(0, 2**bits, size=count, dtype=np.uint64) for _ in range(rows)]
    summed = PackedSum(bits, count)
    summed.add_many([pack_words(w, bits) for w in words], threads=threads)
    assert summed.added == rows
    assert np.array_equal(summed.total(), sum_words(words, bits=bits) if count else np.zeros(0))


def test_accumulate_masks_and_unmask_sum_refuse_misuse() -> None:
    acc = np.zeros(4, dtype=np.uint32)
    with pytest.raises(ValueError, match="dtype"):
        masking.accumulate_masks(acc, [(bytes(32), 1)], bits=8)  # 8-bit words live in uint8
    with pytest.raises(ValueError, match="sign"):
        masking.accumulate_masks(acc, [(bytes(32), 2)], bits=20)
    with pytest.raises(ValueError, match="threads"):
        masking.accumulate_masks(acc, [(bytes(32), 1)], bits=20, threads=0)
    with pytest.raises(ValueError, match="contiguous"):
        masking.accumulate_masks(np.zeros(8, dtype=np.uint32)[::2], [(bytes(32), 1)], bits=20)
    key = generate_private_key()
    inst = {"run_id": "r", "round": 0, "bucket": 0}
    with pytest.raises(ValueError, match="both survivors and dropped"):
        unmask_sum([0], bits=8, survivor_seeds={"a": bytes(32)}, dropped={"a": DroppedClient(key, {})}, **inst)
    with pytest.raises(ValueError, match="not a survivor"):
        unmask_sum([0], bits=8, survivor_seeds={"a": bytes(32)},
                   dropped={"d": DroppedClient(key, {"b": key.public_key()})}, **inst)
    with pytest.raises(ValueError, match="flat integer"):
        mask_input([0.5], bits=8, me="a", self_seed=bytes(32), mask_private_key=key, neighbour_mask_publics={},
                   **inst)
    with pytest.raises(ValueError, match="itself"):
        mask_input([1], bits=8, me="a", self_seed=bytes(32), mask_private_key=key,
                   neighbour_mask_publics={"a": key.public_key()}, **inst)
    with pytest.raises(ValueError, match="at least one row"):
        sum_words([], bits=8)
