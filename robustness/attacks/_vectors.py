"""Flattened views of updates and the math the white-box attacks share (vectorised, float64).

An update is a mapping of tensor name -> array; attacks work on one flat vector per client (the
tensors concatenated in the update's key order) and split the result back into the update's
tensors, shapes and dtypes. The statistics of the honest updates (mean, coordinate-wise standard
deviation, distances) are computed on the ``(m, d)`` matrix at once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from robustness.errors import RobustnessError

#: The min-max / min-sum search of Shejwalkar & Houmansadr (NDSS 2021): first gamma and stop width.
GAMMA_START = 10.0
GAMMA_TOLERANCE = 1e-5
PERTURBATIONS = ("unit-vec", "sign", "std")


def flatten(update: Mapping[str, np.ndarray]) -> np.ndarray:
    """One float64 vector: the tensors of ``update`` raveled and concatenated in key order."""
    if not update:
        return np.zeros(0, np.float64)
    return np.concatenate([np.asarray(value, np.float64).ravel() for value in update.values()])


def unflatten(vector: np.ndarray, like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Split ``vector`` into the tensors of ``like`` (same names, shapes and float dtypes)."""
    sizes = [int(np.size(value)) for value in like.values()]
    if int(vector.size) != sum(sizes):
        raise RobustnessError(f"a vector of {vector.size} values cannot fill an update of {sum(sizes)} values")
    parts = np.split(vector, np.cumsum(sizes)[:-1]) if sizes else []
    out = {}
    for (name, value), part in zip(like.items(), parts):
        dtype = np.asarray(value).dtype
        out[name] = part.reshape(np.shape(value)).astype(dtype if dtype.kind == "f" else np.float32)
    return out


def honest_matrix(
    update: Mapping[str, np.ndarray], honest: Sequence[Mapping[str, np.ndarray]], *, attack: str, minimum: int = 1
) -> np.ndarray:
    """The ``(m, d)`` float64 matrix of the honest updates, laid out like ``update``.

    Raises
    ------
    RobustnessError
        Fewer than ``minimum`` honest updates, or one whose tensors differ from ``update``'s
        (the message names the update's index and the tensor).
    """
    if len(honest) < minimum:
        raise RobustnessError(
            f"attack.kind={attack!r} needs at least {minimum} honest update(s) of the round, got {len(honest)}"
        )
    for index, other in enumerate(honest):
        if set(other) != set(update):
            raise RobustnessError(
                f"attack.kind={attack!r}: honest update {index} has tensors {sorted(other)}, expected {sorted(update)}"
            )
        for name, value in update.items():
            if np.shape(other[name]) != np.shape(value):
                raise RobustnessError(
                    f"attack.kind={attack!r}: honest update {index}, tensor {name!r} has shape "
                    f"{np.shape(other[name])}, expected {np.shape(value)}"
                )
    return np.stack([flatten({name: other[name] for name in update}) for other in honest])


def coordinate_std(matrix: np.ndarray) -> np.ndarray:
    """Coordinate-wise sample standard deviation (ddof = 1, as ``torch.std`` in the papers' code)."""
    return np.asarray(matrix.std(axis=0, ddof=1), np.float64)


def perturbation(kind: str, matrix: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """The direction ``p`` of min-max / min-sum: ``-mu/||mu||``, ``-sign(mu)`` or ``-sigma``."""
    if kind == "unit-vec":
        norm = float(np.linalg.norm(mean))
        return -mean / norm if norm > 0 else np.zeros_like(mean)
    if kind == "sign":
        return np.asarray(-np.sign(mean), np.float64)
    if kind == "std":
        return -coordinate_std(matrix)
    raise ValueError(f"perturbation must be one of {', '.join(PERTURBATIONS)}, got {kind!r}")


def check_perturbation(kind: str) -> None:
    """Refuse an unknown ``perturbation`` setting, naming it."""
    if kind not in PERTURBATIONS:
        raise ValueError(f"perturbation must be one of {', '.join(PERTURBATIONS)}, got {kind!r}")


def gamma_search(satisfied: Callable[[float], bool]) -> float:
    """The largest ``gamma`` the condition admits, by the search of Shejwalkar & Houmansadr (2021).

    Start at ``gamma = 10`` with ``step = 10 / 2``; after a success remember ``gamma`` and add the
    step, after a failure subtract it; halve the step every iteration; stop once
    ``|gamma_succ - gamma| <= 1e-5`` and return ``gamma_succ`` (0 if no gamma succeeded). Since
    the step halves, gamma stays below 20.
    """
    gamma, step, succeeded = GAMMA_START, GAMMA_START / 2, 0.0
    while abs(succeeded - gamma) > GAMMA_TOLERANCE:
        if satisfied(gamma):
            succeeded = gamma
            gamma += step
        else:
            gamma -= step
        step /= 2
    return succeeded


def centred_terms(matrix: np.ndarray, mean: np.ndarray, direction: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """``(a, b, c)`` with ``||x_i - (mean + g p)||^2 = a_i - 2 g b_i + g^2 c`` for every honest ``x_i``.

    ``a_i = ||x_i - mean||^2``, ``b_i = <x_i - mean, p>``, ``c = ||p||^2``: each gamma of the search
    then costs O(m) instead of O(m d).
    """
    centred = matrix - mean
    return np.einsum("ij,ij->i", centred, centred), centred @ direction, float(direction @ direction)


def pairwise_sq_distances(matrix: np.ndarray) -> np.ndarray:
    """``(m, m)`` squared Euclidean distances, from the Gram matrix of the centred rows."""
    centred = matrix - matrix.mean(axis=0)
    gram = centred @ centred.T
    norms = np.diag(gram)
    return np.asarray(np.maximum(norms[:, None] + norms[None, :] - 2 * gram, 0.0), np.float64)
