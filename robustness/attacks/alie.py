"""``alie``: "A Little Is Enough" (Baruch, Baruch and Goldberg, NeurIPS 2019), white-box."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from robustness.attacks._vectors import coordinate_std
from robustness.attacks._white_box import WhiteBoxAttack
from robustness.attacks.base import AttackContext
from robustness.errors import RobustnessError


def alie_z_max(n: int, f: int) -> float:
    """``z_max = Phi^-1((n - s) / n)`` with ``s = floor(n/2 + 1) - f`` (Baruch et al. 2019).

    ``s`` is how many honest clients the attackers must win over for a majority; ``z_max`` is how
    far (in standard deviations) an update may sit from the mean while that many honest ones are
    still farther. ``alie_z_max(50, 12) = 0.582842``.

    Raises
    ------
    RobustnessError
        ``n < 1`` or ``f`` outside ``[1, n)``, or ``(n - s) / n`` outside ``(0, 1)`` (the attackers
        already hold a majority, ``s <= 0``: no finite ``z``).
    """
    if n < 1 or not 1 <= f < n:
        raise RobustnessError(f"ALIE needs 1 <= f < n, got n={n}, f={f}")
    s = math.floor(n / 2 + 1) - f
    p = (n - s) / n
    if not 0 < p < 1:
        raise RobustnessError(
            f"ALIE with n={n}, f={f}: s = floor(n/2 + 1) - f = {s}, so (n - s)/n = {p:g} is outside (0, 1) "
            "(the attackers already hold a majority); set attack.params.z"
        )
    return NormalDist().inv_cdf(p)


class ALittleIsEnough(WhiteBoxAttack):
    """Send ``mu - z_max * sigma`` of the round's honest updates (all attackers the same update).

    ``mu`` and ``sigma`` are the coordinate-wise mean and sample standard deviation of the honest
    updates; ``z_max`` follows from the cohort size ``n`` and the attackers ``f`` of the round
    (`alie_z_max`), unless ``z`` overrides it.

    Parameters
    ----------
    z:
        Use this ``z`` instead of ``z_max(n, f)`` (finite); unset: compute it every round.
    """

    name = "alie"
    paper = "https://arxiv.org/abs/1902.06156"

    def __init__(self, *, z: float | None = None) -> None:
        if z is not None and (isinstance(z, bool) or not isinstance(z, (int, float)) or not math.isfinite(z)):
            raise ValueError(f"z must be a finite number (or unset), got {z!r}")
        self.z = None if z is None else float(z)

    def craft(self, honest: np.ndarray, context: AttackContext) -> np.ndarray:
        """Return ``mu - z * sigma`` of the round's honest updates."""
        z = self.z if self.z is not None else alie_z_max(context.cohort_size, context.num_attackers)
        return np.asarray(honest.mean(axis=0) - z * coordinate_std(honest), dtype=np.float64)
