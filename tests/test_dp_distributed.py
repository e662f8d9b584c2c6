"""``privacy.mode = "distributed"``: clients add discrete Gaussian noise shares under SecAgg+.

The sampler's moments, the noise that actually sits on an unmasked bucket sum (real SecAgg+
halves in memory, zero updates, many coordinates, dropouts at the tolerated maximum), the refusal
to unmask a bucket below n_min on both halves, the plan's noise headroom, the RDP of the new event
against the continuous Gaussian and opacus, the ledger round trip, the refused combinations, and a
short simulation on the smoke preset.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from privacy.accounting import DiscreteGaussianEvent, GaussianEvent, create_accountant
from privacy.accounting.base import _merged
from privacy.accounting.ddgauss import ddg_rdp, ddg_tau, poisson_subsampled_rdp
from privacy.accounting.rdp import DEFAULT_ORDERS, discrete_gaussian_rdp, rdp_epsilon
from privacy.ledger import PrivacyLedger, ReleaseAccounting, chain_lines, event_of
from privacy.mechanisms.distributed import DistributedDP, headroom_multiplier, sample_discrete_gaussian
from protocols.errors import ProtocolAbort, ProtocolError, Refused, WrapAround
from protocols.secagg import ClientContext, ClientRound, PhaseData, RoundContext
from protocols.secagg import secaggplus_stages as st
from protocols.secagg.quantize import QuantizationPlan, check_no_wrap, dequantize_sum
from protocols.secagg.secaggplus import SecAggPlus
from protocols.wire.serde import TensorSpec
from secure_fl.client.mods import mechanism_context
from secure_fl.errors import ConfigError
from secure_fl.simulation import simulate
from secure_fl.stages import Stages
from tests.conftest import smoke_config
from tests.harness import drive

DISTRIBUTED = ["secure.mode=secagg+", "privacy.mode=distributed", "privacy.params.noise_multiplier=1.0"]
D = 30_000
SPEC = {"w": TensorSpec("w", "float32", (D,))}
COHORT = tuple(f"c{i}" for i in range(10))  # one bucket of 10: dropout_fraction 0.2 tolerates 2, n_min = 8


def _exact_moments(sigma: float) -> tuple[float, float]:
    ys = np.arange(-int(15 * sigma) - 10, int(15 * sigma) + 11, dtype=np.float64)
    p = np.exp(-(ys**2) / (2 * sigma * sigma))
    p /= p.sum()
    return float((p * ys).sum()), float((p * ys * ys).sum())


# ------------------------------------------------------------------------------ sampler


@pytest.mark.parametrize("sigma", [0.7, 3.0, 50.0])
def test_the_sampler_has_the_discrete_gaussians_mean_and_variance(sigma: float) -> None:
    n = 200_000
    x = sample_discrete_gaussian(n, sigma, np.random.default_rng(7))
    assert x.dtype == np.int64 and x.shape == (n,)
    _, var = _exact_moments(sigma)  # for sigma = 0.7 the variance is below sigma^2 (0.41 vs 0.49)
    assert abs(x.mean()) < 5 * math.sqrt(var / n)
    assert x.var() == pytest.approx(var, rel=5 * math.sqrt(2 / n) + 1e-3)


def test_the_sampler_matches_the_probability_mass_function() -> None:
    sigma, n = 1.5, 200_000
    x = sample_discrete_gaussian(n, sigma, np.random.default_rng(11))
    ys = np.arange(-6, 7)
    p = np.exp(-(ys**2) / (2 * sigma**2))
    p /= np.exp(-(np.arange(-40, 41) ** 2) / (2 * sigma**2)).sum()
    counts = np.array([(x == y).sum() for y in ys])
    chi2 = float((((counts - n * p) ** 2) / (n * p)).sum())
    assert chi2 < 40  # 13 cells: the 0.9999 quantile of chi-square(12) is about 38
    assert sample_discrete_gaussian(5, 0.0, np.random.default_rng(0)).tolist() == [0] * 5


# ------------------------------------------------------------------------------ SecAgg+ halves in memory


class _NoisingClient(ClientRound):
    """The real SecAgg+ client half plus the mechanism's noise share between quantise and mask (mods order)."""

    def __init__(self, inner: ClientRound, mechanism: DistributedDP, client_id: str) -> None:
        self.inner, self.mechanism, self.client_id = inner, mechanism, client_id

    def on_phase(self, phase: str, data: PhaseData) -> PhaseData:
        return self.inner.on_phase(phase, data)

    def quantise(self, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        context = mechanism_context(self.inner, round_number=1, cohort_size=len(COHORT), bucket_size=len(COHORT),
                                    num_values=D, client_id=self.client_id)
        return self.mechanism.add_noise_share(self.inner.quantise(update), context)

    def mask(self, quantised: Mapping[str, np.ndarray], *, weight: float, data: PhaseData) -> PhaseData:
        return self.inner.mask(quantised, weight=weight, data=data)


def _round(z: float = 1.0) -> tuple[SecAggPlus, DistributedDP, object, dict[str, ClientRound]]:
    protocol = SecAggPlus(dropout_fraction=0.2)
    mechanism = DistributedDP(clip_norm=1.0, noise_multiplier=z)
    protocol.enable_distributed_noise(headroom=mechanism.noise_headroom)
    server = protocol.server_round(RoundContext("run-d", 1, COHORT, (COHORT,), SPEC, 30.0))
    clients: dict[str, ClientRound] = {
        c: _NoisingClient(protocol.client_round(ClientContext("run-d", 1, c, SPEC)), mechanism, c) for c in COHORT
    }
    return protocol, mechanism, server, clients


def _zeros() -> tuple[dict[str, dict[str, np.ndarray]], dict[str, float]]:
    return {c: {"w": np.zeros(D, np.float32)} for c in COHORT}, {c: 1.0 for c in COHORT}


@pytest.mark.parametrize("dropped", [0, 2])
def test_the_noise_on_a_bucket_sum_has_the_accounted_std_even_with_the_most_dropouts(dropped: int) -> None:
    protocol, mechanism, server, clients = _round()
    updates, weights = _zeros()
    drive(server, clients, updates, weights, drops={st.MASKED_INPUT: COHORT[:dropped]})
    (bucket,) = server.result()  # type: ignore[attr-defined]
    assert len(bucket.members) == len(COHORT) - dropped and bucket.weight == len(bucket.members)
    step = protocol.quantisation_step
    noise = np.ravel(bucket.total["w"]) / step  # zero updates quantise exactly: the sum is the noise alone
    np.testing.assert_array_equal(noise, np.round(noise))
    sigma = mechanism.target_std(step, D)  # z * (C / gamma + sqrt(d)) in integer steps
    assert sigma == pytest.approx(1.0 / step + math.sqrt(D))
    expected = sigma * math.sqrt(len(bucket.members) / protocol.min_survivors(len(COHORT)))
    assert protocol.min_survivors(len(COHORT)) == 8
    assert noise.std() == pytest.approx(expected, rel=0.03)  # std error ~0.4% with 30000 coordinates
    assert noise.std() >= 0.97 * sigma  # never less than the accounted noise
    assert abs(noise.mean()) < 5 * expected / math.sqrt(D)
    # the event accounts exactly this bucket: n_min s^2 = sigma^2
    mechanism.bind(step=step, buckets=protocol.noise_buckets, num_values=D, cohort_size=len(COHORT))
    event = mechanism.privacy_event(cohort_size=len(COHORT), population=len(COHORT), contributions=8)
    assert (event.min_clients, event.max_clients, event.dimension) == (8, 10, D)
    assert event.min_clients * event.local_std**2 == pytest.approx(sigma**2)


def test_a_bucket_below_n_min_is_not_unmasked_by_the_server() -> None:
    _, _, server, clients = _round()
    updates, weights = _zeros()
    with pytest.raises(ProtocolAbort, match="sized for at least 8"):
        drive(server, clients, updates, weights, drops={st.MASKED_INPUT: COHORT[:3]})


def test_a_client_refuses_to_unmask_when_the_server_lists_too_few_survivors() -> None:
    protocol, _, server, clients = _round()
    updates, weights = _zeros()
    phase = drive(server, clients, updates, weights, drops={st.MASKED_INPUT: COHORT[:2]}, stop_at=st.UNMASK)
    assert phase is not None and phase.name == st.UNMASK
    me = phase.participants[0]
    payload = phase.payloads[me]
    survivors = st.decode_ids(payload.blobs[st.SURVIVORS])
    assert len(survivors) == 8 and me in survivors
    named = set(st.decode_ids(payload.blobs[st.SURVIVED]))
    extra = next(c for c in survivors if c != me and c not in named)
    short = PhaseData(blobs={**payload.blobs, st.SURVIVORS: st.encode_ids([c for c in survivors if c != extra])})
    with pytest.raises(Refused, match="sized for at least 8"):
        clients[me].on_phase(st.UNMASK, short)  # a server that skipped its own check gets no shares
    other = phase.participants[1]
    missing = PhaseData(blobs={k: v for k, v in phase.payloads[other].blobs.items() if k != st.SURVIVORS})
    with pytest.raises(Refused, match="survivor list"):
        clients[other].on_phase(st.UNMASK, missing)


def test_without_noise_the_unmask_payload_and_the_plan_are_unchanged() -> None:
    plain = SecAggPlus(dropout_fraction=0.2)
    noisy = SecAggPlus(dropout_fraction=0.2)
    noisy.enable_distributed_noise(headroom=DistributedDP().noise_headroom)
    assert plain.plan(10, D) == plain.plan(10) and plain.plan(10).noise_headroom == 0
    assert plain.plan(10).max_weight == 1024 and noisy.plan(10).max_weight == 1  # uniform weights save 10 bits
    assert noisy.plan(10, D).noise_headroom > 0 and noisy.plan(10, D).bits < plain.plan(10).bits


# ------------------------------------------------------------------------------ the plan's headroom


def test_a_noised_sum_decodes_inside_the_headroom_and_aborts_outside() -> None:
    plan = QuantizationPlan(clip_range=1.0, levels=16, bucket_size=3, noise_headroom=40)
    assert plan.bits == math.ceil(math.log2(3 * 16 + 80)) + 1
    assert QuantizationPlan(clip_range=1.0, levels=16, bucket_size=3).bits == 7  # H = 0: the old rule
    exact = np.array([-40, -1, 0, 24, 48 + 40])  # 3 clients, Q = 16: [0, 48] plus the headroom either way
    words = (exact % plan.modulus).astype(np.uint32)
    decoded = dequantize_sum(words, plan, 3, 3)
    np.testing.assert_array_equal(decoded, (2 * exact - 48) * 1.0 / 16)
    for beyond in (-41, 48 + 41):
        with pytest.raises(WrapAround, match="noise headroom 40"):
            check_no_wrap(np.array([beyond % plan.modulus], np.uint32), plan, count=3, total_weight=3)


def test_the_headroom_is_k_sigma_for_a_two_to_the_minus_40_tail() -> None:
    mechanism = DistributedDP(clip_norm=1.0, noise_multiplier=2.0)
    k = headroom_multiplier(D)
    assert 2 * D * math.exp(-k * k / 2) == pytest.approx(2.0**-40)
    step = 2.0**-12
    h = mechanism.noise_headroom(10, 8, D, step)
    assert h == math.ceil(k * 2.0 * (1 / step + math.sqrt(D)) * math.sqrt(10 / 8))
    assert DistributedDP(noise_multiplier=0.0).noise_headroom(10, 8, D, step) == 0


# ------------------------------------------------------------------------------ accounting


def _event(local_std: float, **kw: object) -> DiscreteGaussianEvent:
    values: dict[str, object] = dict(local_std=local_std, min_clients=8, max_clients=10, l2_sensitivity=4237.0,
                                     l1_sensitivity=4237.0 * math.sqrt(D), dimension=D)
    values.update(kw)
    return DiscreteGaussianEvent(**values)  # type: ignore[arg-type]


def test_with_a_large_local_std_the_rdp_is_the_continuous_gaussians() -> None:
    from opacus.accountants.analysis import rdp as analysis

    event = _event(1500.0)
    assert ddg_tau(event.local_std, event.max_clients) == 0.0
    z = event.effective_noise_multiplier
    gaussian = np.asarray(analysis.compute_rdp(q=1.0, noise_multiplier=z, steps=1, orders=list(DEFAULT_ORDERS)))
    np.testing.assert_allclose(discrete_gaussian_rdp(event, DEFAULT_ORDERS), gaussian, rtol=1e-6)
    assert rdp_epsilon([event], 1e-5) == pytest.approx(rdp_epsilon([GaussianEvent(z, 1.0)], 1e-5), rel=1e-6)
    # the algorithms.md oracle: n = 100, local std 0.1 in units of the scale 125521.24 -> tau ~ 0
    assert ddg_tau(0.1 * 125521.24, 100) < 1e-300


def test_a_small_local_std_costs_more_than_the_continuous_gaussian() -> None:
    small = _event(0.4, l2_sensitivity=2.0, l1_sensitivity=4.0, dimension=100)
    tau = ddg_tau(0.4, 10)
    assert tau > 0.1
    gaussian = np.asarray(DEFAULT_ORDERS) * 2.0**2 / (2 * 8 * 0.4**2)
    got = discrete_gaussian_rdp(small, DEFAULT_ORDERS)
    assert (got > gaussian).all()
    expected = ddg_rdp(DEFAULT_ORDERS, local_std=0.4, min_clients=8, max_clients=10, l2_sensitivity=2.0,
                       l1_sensitivity=4.0, dimension=100)
    np.testing.assert_array_equal(got, expected)
    alpha = np.asarray(DEFAULT_ORDERS)
    l2 = 2.0 / (math.sqrt(8) * 0.4)
    third = alpha / 2 * (l2 + tau * 10.0) ** 2  # (alpha/2)(D2/(sqrt(n) s) + tau sqrt(d))^2, one of the three terms
    assert (got <= third + 1e-12).all()


@pytest.mark.parametrize(("z", "q", "steps", "slack"), [(1.0, 0.01, 1000, 0.2), (2.0, 0.01, 100, 0.3), (1.0, 0.1, 100, 0.3)])
def test_the_subsampled_bound_is_above_opacus_and_close_to_it(z: float, q: float, steps: int, slack: float) -> None:
    from opacus.accountants.analysis import rdp as analysis

    orders = list(DEFAULT_ORDERS)
    ours = poisson_subsampled_rdp(orders, sample_rate=q, rdp=lambda a: a / (2 * z * z))
    tight = np.asarray(analysis.compute_rdp(q=q, noise_multiplier=z, steps=1, orders=orders))
    assert (ours >= tight - 1e-12).all()  # a valid bound for any mechanism is never below the Gaussian's tight one
    eps_ours, _ = analysis.get_privacy_spent(orders=orders, rdp=ours * steps, delta=1e-5)
    eps_tight, _ = analysis.get_privacy_spent(orders=orders, rdp=tight * steps, delta=1e-5)
    assert eps_tight <= eps_ours <= eps_tight * (1 + slack)  # measured: +17%, +28%, +24% (the factor 3 on orders >= 3)


def test_the_ledger_records_and_replays_the_exact_event(tmp_path: Path) -> None:
    event = _event(1500.0, sample_rate=0.5)
    accounting = ReleaseAccounting(PrivacyLedger(tmp_path / "ledger.jsonl"),
                                   {"rdp": create_accountant("rdp"), "prv": create_accountant("prv")}, delta=1e-5)
    line = accounting.record(round=1, event=event, mechanism=DistributedDP().describe())
    assert line["event"] == DiscreteGaussianEvent.KIND and line["local_std"] == 1500.0 and line["dimension"] == D
    assert line["noise_multiplier"] == pytest.approx(math.sqrt(8) * 1500.0 / 4237.0)
    assert "distributed discrete Gaussian" in line["epsilon_notes"]["prv"] and line["epsilon"]["prv"] == line["epsilon"]["rdp"]
    assert event_of(line) == event and PrivacyLedger(tmp_path / "ledger.jsonl").events() == [event]
    again = ReleaseAccounting(PrivacyLedger(tmp_path / "ledger.jsonl"), {"rdp": create_accountant("rdp")}, delta=1e-5)
    assert again.epsilon()["rdp"] == line["epsilon"]["rdp"]
    accountant = create_accountant("rdp")
    accountant.compose(event)
    accountant.compose(GaussianEvent(1.0, 1.0))
    restored = create_accountant("rdp")
    restored.load_state_dict(json.loads(json.dumps(accountant.state_dict())))
    assert restored.history == accountant.history
    effective = GaussianEvent(event.effective_noise_multiplier, event.sample_rate)
    assert len(_merged([effective, event, event])) == 2  # never merged with a Gaussian of the same z


def test_an_older_gaussian_ledger_line_still_reads(tmp_path: Path) -> None:
    old = {"round": 1, "mechanism": "central", "noise_multiplier": 1.0, "sample_rate": 1.0, "steps": 1,
           "delta": 1e-5, "epsilon": {"rdp": 4.728507}}
    (tmp_path / "ledger.jsonl").write_text(chain_lines([old]))
    assert PrivacyLedger(tmp_path / "ledger.jsonl").events() == [GaussianEvent(1.0, 1.0, 1)]


# ------------------------------------------------------------------------------ configuration


def test_distributed_needs_secagg_plus() -> None:
    with pytest.raises(ConfigError, match="secure.mode='secagg\\+'") as info:
        Stages.from_config(smoke_config("privacy.mode=distributed"))
    assert info.value.key == "secure.mode"


def test_a_plan_past_32_bits_with_the_headroom_is_refused_naming_what_to_lower(tmp_path: Path) -> None:
    # Q = 2^20 levels, weight 1: 24 bits without noise; z = 5000 asks for a headroom near 2^31
    config = smoke_config(*DISTRIBUTED, "secure.params.precision=1.52587890625e-05", "secure.params.max_weight=1",
                          "privacy.params.noise_multiplier=5000.0")
    stages = Stages.from_config(config)  # without the update size the plan still fits
    with pytest.raises(ConfigError, match="precision") as info:
        stages.bind_update(num_values=1156, cohort_size=4)  # what FederatedServer calls once the model is built
    assert info.value.key == "secure.params.precision"
    assert "noise_multiplier" in str(info.value) and "bucket_size" in str(info.value)


def test_the_stages_wire_the_mechanism_and_the_protocol() -> None:
    stages = Stages.from_config(smoke_config(*DISTRIBUTED))
    assert stages.secure.noise_enabled and stages.secure.weight_bound == 1  # type: ignore[attr-defined]
    stages.bind_update(num_values=1000, cohort_size=4)
    facts = stages.privacy.describe()
    assert facts["noise_added_by"] == "clients" and facts["quantisation_step"] == 2.0**-12
    assert facts["buckets"] == [{"n": 4, "n_min": 3, "local_std": pytest.approx((4096 + math.sqrt(1000)) / math.sqrt(3)),
                                 "headroom": stages.secure.plan(4, 1000).noise_headroom}]  # type: ignore[attr-defined]


def test_a_noise_share_needs_an_integer_quantising_protocol() -> None:
    from privacy.errors import PrivacyError
    from privacy.mechanisms import MechanismContext

    with pytest.raises(PrivacyError, match="secagg\\+"):
        DistributedDP().add_noise_share({"a": np.zeros(3, np.float32)}, MechanismContext(round=1, cohort_size=4, bucket_size=1))


# ------------------------------------------------------------------------------ end to end


def test_a_smoke_run_under_secagg_plus_spends_a_finite_epsilon_and_reports_client_noise(tmp_path: Path) -> None:
    result = simulate(smoke_config(*DISTRIBUTED, "run.rounds=1"), tmp_path / "run", progress=False)
    ledger = [json.loads(line) for line in (result.run_dir / "ledger.jsonl").read_text().splitlines()]
    assert len(ledger) == 1 and ledger[0]["mechanism"] == "distributed"
    assert ledger[0]["event"] == DiscreteGaussianEvent.KIND and ledger[0]["min_clients"] == 3
    assert all(math.isfinite(float(v)) for v in ledger[0]["epsilon"].values())
    assert ledger[0]["epsilon"]["rdp"] == pytest.approx(4.728507, rel=1e-3)  # tau = 0: the Gaussian of z = 1
    assert result.report_json is not None
    report = json.loads(result.report_json.read_text())
    assert report["mechanism"]["mode"] == "distributed" and "against the server" in report["mechanism"]["guarantee"]
    assert report["mechanism"]["noise_added_by"] == "clients"
    assert "on each bucket sum" in report["mechanism"]["noise_std_per_sum"]  # the report's noise per bucket
    assert "small-buckets" in {w["code"] for w in report["warnings"]}  # 4 clients in one bucket
    params = report["stages"]["privacy"]["params"]
    assert params["noise_added_by"] == "clients" and params["buckets"][0]["n_min"] == 3
    assert math.isfinite(result.metrics[-1]["accuracy"])
    server = [row for row in report["threat_model"] if row["party"] == "server"][0]
    assert "distributed DP noise" in server["sees"] and "privacy.mode = distributed" in server["protected_by"]
    for client in report["clients"]:  # the per-client view accounts the same event, not a Gaussian of the effective z
        assert client["epsilon"] == ledger[0]["epsilon"]
