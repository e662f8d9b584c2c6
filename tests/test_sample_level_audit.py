"""The sample-level empirical audit of DP-SGD (``privacy.mode = "dp-sgd"``): white-box gradient canary examples."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from privacy.dpsgd import DPSGD
from secure_fl.cli import EXIT_AUDIT_VIOLATION, main
from secure_fl.empirical_audit import CanaryExamples, audit_level
from secure_fl.simulation import simulate
from tests.conftest import smoke_config
from tests.test_dp_sgd import _flat_grads, _Subset, _tiny

#: DP-SGD on the smoke preset, one round: the canaries' signal needs enough local steps to be sampled.
DP_SGD = ("run.rounds=1", "privacy.mode=dp-sgd")


def _json(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def _ledger(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------ the canary in DP-SGD


def test_canary_gradients_are_clipped_and_join_the_sum_before_the_noise() -> None:
    """q = 1: every step holds both canaries; the optimizer's sum grows by exactly their clipped rows."""
    model, workload, data = _tiny()
    subset = _Subset(data, torch.arange(4))
    params = [p for p in model.parameters() if p.requires_grad]
    size = sum(p.numel() for p in params)
    clip = 1e-3
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((2, size))
    rows[0] *= 5 * clip / np.linalg.norm(rows[0])  # above the clip bound: clipped to C
    rows[1] *= 0.5 * clip / np.linalg.norm(rows[1])  # below it: unchanged
    runs = []
    for canaries in (None, rows):
        seen: list[torch.Tensor] = []
        DPSGD(noise_multiplier=0.0, max_grad_norm=clip).train(
            model, workload.loss, subset.batch, 4, steps=1, batch_size=4, lr=0.0,
            on_step=lambda ps: seen.append(_flat_grads(list(ps)) * 4), canaries=canaries,  # grad = sum / (q n)
        )
        runs.append(seen[0])
    expected = torch.from_numpy(rows[0] / 5 + rows[1])
    torch.testing.assert_close(runs[1] - runs[0], expected, rtol=1e-4, atol=1e-10)
    with pytest.raises(ValueError, match=f"\\(k, {size}\\)"):
        DPSGD(noise_multiplier=0.0).train(model, workload.loss, subset.batch, 4, steps=1, batch_size=4, lr=0.0,
                                          canaries=rows[:, :-1])


def test_canary_examples_live_in_the_honest_parties_on_the_clip_bound() -> None:
    """No extra party; each inserted canary is one row of its host's canaries, norm C, zero off the released tensors."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    names = [n for n, _ in model.named_parameters()]
    keys = names[:3]  # the last bias trains but does not travel
    state = {n: p.detach().numpy().copy() for n, p in model.named_parameters() if n in keys}
    honest = [SimpleNamespace(adapted=SimpleNamespace(model=model), update_keys=keys, dp_sgd=object(),
                              rule=SimpleNamespace(name="fedit"), canaries=None) for _ in range(3)]
    server = SimpleNamespace(global_state=dict(state))
    design = CanaryExamples(60, norm=2.0)
    assert design.build(server, honest) == [] and design.count == 0  # type: ignore[arg-type]
    assert set(design.hosts.tolist()) <= {0, 1, 2}
    for index, trainer in enumerate(honest):
        expected = int((design.inserted & (design.hosts == index)).sum())
        rows = trainer.canaries if trainer.canaries is not None else np.zeros((0, 26))
        assert rows.shape == (expected, 26)
        np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 2.0, rtol=1e-6)
        assert not rows[:, -2:].any()  # the non-released bias gets no canary component
    # a release moving along +u_i (descent on the gradient -C u_i) scores C for that canary
    first = int(np.flatnonzero(design.inserted)[0])
    host = honest[int(design.hosts[first])]
    row = host.canaries[int((design.inserted & (design.hosts == design.hosts[first]))[:first].sum())]
    pieces = np.split(-row[:-2], np.cumsum([state[k].size for k in keys])[:-1])
    server.global_state = {k: state[k] + p.reshape(state[k].shape) for k, p in zip(keys, pieces)}
    design.on_round_end({"status": "ok"})
    assert design.scores[first] == pytest.approx(2.0, rel=1e-5)
    assert np.abs(np.delete(design.scores, first)).max() < 2.0


# ------------------------------------------------------------------------------ runs


def test_without_dp_sgd_noise_the_canary_examples_are_found_and_the_report_shows_the_sample_level(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """z = 0 (no guarantee): the CLI audits dp-sgd; 30 local steps sample each canary about 5 times."""
    run = tmp_path / "run"
    simulate(smoke_config(*DP_SGD, "client.local_steps=30", "privacy.dp_sgd_params.noise_multiplier=0"), run,
             progress=False)
    assert audit_level(smoke_config(*DP_SGD)) == "sample"
    assert main(["audit", str(run), "--empirical", "--canaries", "100"]) == 0
    out = capsys.readouterr().out
    data = _json(run / "empirical_audit.json")
    bound = float(data["epsilon_lower_bound"])
    assert bound > 0.7, data  # 1.1 to 2.1 over ten runs
    assert (data["level"], data["canary_kind"], data["canary_clip"]) == ("sample", "gradient-example", "per-example")
    assert data["verdict"] == "no-guarantee" and data["theoretical_epsilon_min"] is None
    assert "canary examples" in out and f"epsilon >= {bound:.4f}" in out
    assert len(data["canary_hosts"]) == 100 and set(data["canary_hosts"]) <= {f"client-{i}" for i in range(4)}
    # no party was added, and every party kept its own sampling rate and steps
    original, audited = _ledger(run), _ledger(run / "empirical-audit")
    assert audited[0]["contributors"] == original[0]["contributors"] == [f"client-{i}" for i in range(4)]
    assert audited[0]["sample_level"] == original[0]["sample_level"]
    report = _json(run / "report" / "privacy_report.json")
    assert report["empirical_audit"]["level"] == "sample" and report["empirical_audit"]["epsilon_lower_bound"] == bound
    page = (run / "report" / "privacy_report.html").read_text(encoding="utf-8")
    assert "<h2>Empirical audit</h2>" in page and "sample (each training example, DP-SGD)" in page
    assert "canary examples (white-box DP-SGD gradients) (inserted)" in page and f"{bound:.4f}" in page
    assert f"Empirical sample-level ε ≥ {bound:.4f}" in page


def test_with_strong_dp_sgd_noise_the_bound_is_small_and_below_the_hosts_sample_level_epsilon(tmp_path: Path) -> None:
    """z = 2, 10 steps: privacy.audit = true audits the run; the theory is the largest host's sample-level epsilon."""
    config = smoke_config(*DP_SGD, "privacy.dp_sgd_params.noise_multiplier=2", "privacy.audit=true",
                          "privacy.audit_canaries=50")
    result = simulate(config, tmp_path, progress=False)
    assert result.empirical_audit == tmp_path / "empirical_audit.json"
    data = _json(tmp_path / "empirical_audit.json")
    bound, theory = float(data["epsilon_lower_bound"]), float(data["theoretical_epsilon_min"])
    rows = _json(tmp_path / "empirical-audit" / "report" / "privacy_report.json")["clients"]
    hosts = {h for h, coin in zip(data["canary_hosts"], data["canary_coins"]) if coin}
    for name, value in data["theoretical_epsilon"].items():
        assert value == max(r["sample_level"]["epsilon"][name] for r in rows if r["client_id"] in hosts)
    assert 0 < theory < 5 and bound < min(0.5, theory)
    assert data["verdict"] == "consistent" and data["level"] == "sample"
    page = (tmp_path / "report" / "privacy_report.html").read_text(encoding="utf-8")
    assert "theoretical sample-level ε of the canaries&#x27; host clients" in page or \
        "theoretical sample-level ε of the canaries' host clients" in page
    assert f"{theory:.4f}" in page and "empirical-above-theory" not in page


def test_a_dp_sgd_that_accounts_for_noise_it_does_not_add_is_reported_as_a_bug(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injected on purpose: the optimizer adds no noise while the ledger accounts z = 20 (epsilon about 0.2)."""
    from privacy import dpsgd

    optimizer = dpsgd._secure_dp_optimizer()
    honest_noise: Any = optimizer.add_noise  # type: ignore[attr-defined]

    def no_noise(self: Any) -> None:
        accounted, self.noise_multiplier = self.noise_multiplier, 0.0
        try:
            honest_noise(self)
        finally:
            self.noise_multiplier = accounted

    monkeypatch.setattr(optimizer, "add_noise", no_noise)
    args = ["simulate", "--preset", "smoke", "--out", str(tmp_path), *(f"--set={o}" for o in DP_SGD),
            "--set=client.local_steps=30", "--set=privacy.dp_sgd_params.noise_multiplier=20", "--set=privacy.audit=true"]
    assert main(args) == EXIT_AUDIT_VIOLATION
    assert "BUG: the empirical lower bound" in capsys.readouterr().err
    data = _json(tmp_path / "empirical_audit.json")
    assert data["verdict"] == "violation" and data["level"] == "sample"
    assert float(data["epsilon_lower_bound"]) > 2 * float(data["theoretical_epsilon_min"])
    report = _json(tmp_path / "report" / "privacy_report.json")
    assert report["warnings"][0]["code"] == "empirical-above-theory"
    assert "theoretical sample-level epsilon" in report["warnings"][0]["message"]
