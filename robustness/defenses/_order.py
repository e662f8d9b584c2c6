"""Coordinate-wise order statistics over the rows of an ``(n, d)`` matrix: median, trimmed mean,
and Bulyan's "mean of the beta values closest to the median".

Why not ``np.median`` / ``torch.sort``: those run one scalar selection per coordinate (about a
microsecond for 50 values, so about a second for d = 10^6). Here one *sorting network* (Batcher's
odd-even merge sort, padded to a power of two with virtual -inf/+inf wires that cost nothing) is
applied to all coordinates at once: each comparator is one ``np.minimum`` and one ``np.maximum``
over a block of 32768 coordinates, so the work is SIMD and cache-resident. The network is pruned
backwards to the comparators that change *which class* each rank ends in (e.g. for a trimmed mean,
the order inside the kept middle does not matter), which removes about 40 % of them. The loop over
comparators is a loop over the network (fixed, at most a few thousand steps), never over
coordinates. The network has about n log^2 n / 4 comparators against the n log n comparisons per
coordinate of a sort, but each is a SIMD pass; above `NETWORK_MAX_ROWS` (tens of thousands of
comparators) ``torch.sort`` is used instead.

Inputs are assumed checked by the caller (`robustness.defenses._rules`): 2-D, float32, finite.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache

import numpy as np

#: Coordinates per block: 50 rows of 32768 float32 (6.5 MB) stay in cache while the network runs.
BLOCK = 32768
#: Above this many rows the plan itself gets large; one ``torch.sort`` along the rows is used.
NETWORK_MAX_ROWS = 1024


def _merge(lo: int, hi: int, r: int) -> Iterator[tuple[int, int]]:
    step = r * 2
    if step < hi - lo:
        yield from _merge(lo, hi, step)
        yield from _merge(lo + r, hi, step)
        yield from ((i, i + r) for i in range(lo + r, hi - r, step))
    else:
        yield (lo, lo + r)


def _sort(lo: int, hi: int) -> Iterator[tuple[int, int]]:
    if hi - lo >= 1:
        mid = lo + (hi - lo) // 2
        yield from _sort(lo, mid)
        yield from _sort(mid + 1, hi)
        yield from _merge(lo, hi, 1)


@lru_cache(maxsize=64)
def _plan(classes: tuple[int, ...]) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...]]:
    """Comparators ``(a, b)`` on row buffers (min goes to ``a``) and the buffer holding each rank.

    ``classes[r]`` labels rank ``r``; after the pruned network, every buffer that ends at a rank of
    class ``c`` holds a value of that class, and ranks with a class of their own hold exactly the
    ``r``-th smallest value.
    """
    n = len(classes)
    size = 1
    while size < n:
        size *= 2
    low_pads = (size - n) // 2
    # A wire holds a data buffer (>= 0), a virtual -inf (-1) or a virtual +inf (-2).
    wires = [-1] * low_pads + list(range(n)) + [-2] * (size - n - low_pads)
    comparators: list[tuple[int, int]] = []
    for i, j in _sort(0, size - 1):
        a, b = wires[i], wires[j]
        if a >= 0 and b >= 0:
            comparators.append((a, b))
        elif a == -2 or b == -1:  # the larger value sits on the lower wire: a swap, no arithmetic
            wires[i], wires[j] = b, a
    final = wires[low_pads : low_pads + n]
    label: dict[int, tuple[int, int]] = {buf: (0, classes[r]) for r, buf in enumerate(final)}
    kept: list[tuple[int, int]] = []
    for k, (a, b) in enumerate(reversed(comparators)):
        if label[a] == label[b]:  # both outputs end in the same class either way: order is irrelevant
            continue
        kept.append((a, b))
        label[a] = label[b] = (1, k)  # downstream is symmetric in this comparator's two inputs
    kept.reverse()
    return tuple(kept), tuple(final)


def ranked_reduce(
    x: np.ndarray,
    classes: Sequence[int],
    reduce: Callable[[list[np.ndarray]], np.ndarray],
    rows: Sequence[int] | None = None,
) -> np.ndarray:
    """Apply ``reduce`` to the coordinate-wise ranked rows of ``x`` (optionally only ``rows``).

    ``reduce`` gets a list whose entry ``r`` is a block of the values of rank ``r`` (ranks sharing
    a class hold that class's values in some order) and returns the block of the output.
    """
    index = list(range(x.shape[0])) if rows is None else list(rows)
    n, d = len(index), x.shape[1]
    if n > NETWORK_MAX_ROWS:
        import torch

        ordered = torch.sort(torch.from_numpy(np.ascontiguousarray(x[index])), dim=0).values.numpy()
        return np.asarray(reduce(list(ordered)), dtype=np.float32)
    comparators, final = _plan(tuple(classes))
    out = np.empty(d, dtype=np.float32)
    scratch = np.empty((n + 2, min(BLOCK, d)), dtype=np.float32)  # n rows + 2 spare, recycled
    for start in range(0, d, BLOCK):
        stop = min(start + BLOCK, d)
        block = scratch[:, : stop - start]
        np.take(x[:, start:stop], index, axis=0, out=block[:n])
        buffers = list(block[:n])
        spare_low, spare_high = block[n], block[n + 1]
        for a, b in comparators:
            low, high = buffers[a], buffers[b]
            np.minimum(low, high, out=spare_low)
            np.maximum(low, high, out=spare_high)
            buffers[a], buffers[b], spare_low, spare_high = spare_low, spare_high, low, high
        out[start:stop] = reduce([buffers[final[r]] for r in range(n)])
    return out


def _sum(parts: Sequence[np.ndarray]) -> np.ndarray:
    total = np.array(parts[0], dtype=np.float32, copy=True)
    for part in parts[1:]:
        total += part
    return total


def median_rows(x: np.ndarray) -> np.ndarray:
    """Coordinate-wise median (the mean of the two middle values when n is even)."""
    n = x.shape[0]
    lower, upper = (n - 1) // 2, n // 2
    classes = [0 if r < lower else 1 if r == lower else 2 if r == upper else 3 for r in range(n)]
    return ranked_reduce(x, classes, lambda ranked: ranked[lower] * np.float32(0.5) + ranked[upper] * np.float32(0.5))


def trimmed_rows(x: np.ndarray, b: int) -> np.ndarray:
    """Coordinate-wise mean of the ranks ``b .. n - b - 1`` (``b`` dropped on each side)."""
    n = x.shape[0]
    kept = n - 2 * b
    classes = [0 if r < b else 2 if r >= n - b else 1 for r in range(n)]
    return ranked_reduce(x, classes, lambda ranked: _sum(ranked[b : n - b]) / np.float32(kept))


def closest_to_median_rows(x: np.ndarray, rows: Sequence[int], beta: int) -> np.ndarray:
    """Per coordinate, the mean of the ``beta`` values (of ``rows``) closest to their median.

    The ``beta`` values closest to the median of a sorted column are a window ``[j, j + beta)``;
    ``j`` is the number of ``t < theta - beta`` with ``median - s_t > s_{t+beta} - median`` (the
    window moves right only while the value entering is strictly closer than the one leaving: ties
    keep the lower window). Ranks ``[theta - beta, beta)`` are in every window, so only the other
    ranks and the median ranks need their exact order.
    """
    theta = len(rows)
    slack = theta - beta
    lower, upper = (theta - 1) // 2, theta // 2
    own = set(range(slack)) | set(range(beta, theta)) | {lower, upper}
    classes = [r + 1 if r in own else 0 for r in range(theta)]

    def reduce(ranked: list[np.ndarray]) -> np.ndarray:
        median = ranked[lower] * np.float32(0.5) + ranked[upper] * np.float32(0.5)
        start = np.zeros(median.shape, dtype=np.int64)
        for t in range(slack):  # loop over the 2f edge ranks, vectorised over the coordinates
            start += (median - ranked[t]) > (ranked[t + beta] - median)
        always = range(slack, beta)  # in every window (empty when beta <= slack)
        total = _sum(ranked[slack:beta]) if len(always) else np.zeros_like(median)
        for r in range(theta):  # loop over ranks, vectorised over the coordinates
            if r not in always:
                total += np.where((start <= r) & (start + beta > r), ranked[r], np.float32(0.0))
        return total / np.float32(beta)

    return ranked_reduce(x, classes, reduce, rows)
