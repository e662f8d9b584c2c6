"""Register your own privacy accountant: Gaussian differential privacy (f-DP, Dong, Roth, Su 2019).

A release of the subsampled Gaussian mechanism with noise multiplier ``z`` and sampling rate ``q``
is approximately ``mu``-GDP with ``mu = q * sqrt(T * (exp(1/z^2) - 1))`` after ``T`` steps (the
central limit theorem of Bu et al. 2020; exactly ``sqrt(T) / z`` when ``q = 1``), and ``mu``-GDP
gives ``delta(eps) = Phi(-eps/mu + mu/2) - exp(eps) * Phi(-eps/mu - mu/2)``. The CLT is an
approximation, not an upper bound, which is why secure-fl's built-ins are RDP and PRV; a privacy
officer may still want to see it next to them. One class plus one registration call, then name it
in ``[privacy] accountants``: it gets a column in ``ledger.jsonl`` and in the audit report.

Run:  python examples/custom_accountant.py [--fast] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

from scipy.optimize import brentq
from scipy.stats import norm

import secure_fl


class GDPAccountant(secure_fl.Accountant):
    """mu-GDP accounting; mu composes as the root of the sum of squares."""

    name = "gdp"

    def _epsilon(self, events: Sequence[secure_fl.GaussianEvent], delta: float) -> float:
        mu_squared = 0.0
        for e in events:
            if e.sample_rate == 1.0:
                mu_squared += e.steps / e.noise_multiplier**2
            else:
                mu_squared += e.sample_rate**2 * e.steps * math.expm1(1.0 / e.noise_multiplier**2)
        mu = math.sqrt(mu_squared)

        def excess(eps: float) -> float:
            return float(norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)) - delta

        if excess(0.0) <= 0:
            return 0.0
        high = 1.0
        while excess(high) > 0:
            high *= 2
        return float(brentq(excess, 0.0, high, xtol=1e-10))


secure_fl.register_accountant("gdp", GDPAccountant)


def main(fast: bool = False, out: str | None = None) -> secure_fl.RunResult:
    # The accountant on its own: 1000 rounds, noise multiplier 1, 1% of clients each round.
    schedule = secure_fl.GaussianEvent(noise_multiplier=1.0, sample_rate=0.01, steps=1000)
    for name in ("rdp", "prv", "gdp"):
        accountant = secure_fl.create_accountant(name)
        accountant.compose(schedule)
        print(f"{name}: epsilon {accountant.epsilon(1e-5):.4f} at delta 1e-5 (z=1, q=0.01, 1000 rounds)")

    # In a run: the ledger and the audit report get a "gdp" column (unbounded here: the smoke
    # preset has no differential privacy, and the report says so).
    config = secure_fl.load_preset("smoke").with_overrides(
        ['privacy.accountants=["rdp", "gdp"]', f"run.rounds={2 if fast else 4}"]
    )
    result = secure_fl.simulate(config, out, progress=not fast)
    print(f"ledger: {[entry['epsilon'] for entry in result.ledger]}; report: {result.report_html}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="two rounds (used by the test suite)")
    parser.add_argument("--out", help="run directory (default runs/<run-id>)")
    args = parser.parse_args()
    main(fast=args.fast, out=args.out)
