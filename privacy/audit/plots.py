"""The report's charts: matplotlib figures without pyplot, returned as base64 PNG text.

matplotlib is imported lazily and used without pyplot (a private Agg canvas per figure), so
importing this module stays cheap and rendering never touches the caller's backend. Text is drawn
at `PLOT_FONT` points so that it is as readable as the page's text at the image's natural size.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["PLOT_FONT", "clients_figure", "clients_plot", "line_plot"]

PLOT_FONT = 10.0  # points; at 100 dpi about 14 px, the size of the page's text


def _num(value: object) -> float | None:
    """A finite float, or ``None`` for ``None``, non-numbers, booleans, NaN and infinities."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _new_figure(width: float = 6.0, height: float = 3.0) -> Figure:
    """A small standalone figure with its own Agg canvas.

    ``Figure`` is used without pyplot, so rendering a report never changes the caller's
    matplotlib backend or leaves figures open in a notebook.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> str:
    """Save ``fig`` as PNG (no software metadata) and return the base64 text."""
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _plot_label(text: object, limit: int = 24) -> str:
    """A client id shortened for a plot axis, with ``$`` escaped so matplotlib does no mathtext."""
    label = str(text)
    label = label if len(label) <= limit else label[: limit - 1] + "…"
    return label.replace("$", r"\$")


def line_plot(series: Mapping[str, tuple[list[float], list[float]]], ylabel: str) -> str:
    """A line plot, one line per named series of (rounds, values); returns base64 PNG."""
    from matplotlib.ticker import MaxNLocator

    fig = _new_figure()
    ax = fig.add_subplot()
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", markersize=3, label=_plot_label(name))
    ax.set(xlabel="round", ylabel=ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    return _png(fig)


def clients_plot(clients: Sequence[Mapping[str, Any]]) -> str:
    """The participation chart of `clients_figure` as base64 PNG."""
    return _png(clients_figure(clients))


def clients_figure(clients: Sequence[Mapping[str, Any]]) -> Figure:
    """A stacked horizontal bar per client: rounds aggregated, excluded by the defense, dropped.

    An excluded update was still contributed (the defense looked at it), so the bar shows
    ``contributed - excluded`` as aggregated. Text is drawn at ``PLOT_FONT`` points, readable
    at the image's natural size.
    """
    from matplotlib.ticker import MaxNLocator

    fig = _new_figure(7.0, max(3.0, 0.28 * len(clients) + 1.4))
    ax = fig.add_subplot()
    ys = list(range(len(clients)))
    counts = {k: [_num(c.get(f"rounds_{k}")) or 0.0 for c in clients] for k in ("contributed", "excluded", "dropped")}
    parts = (
        ("aggregated", [max(a - b, 0.0) for a, b in zip(counts["contributed"], counts["excluded"])], "#2e7d32"),
        ("excluded by defense", counts["excluded"], "#c62828"),
        ("dropped", counts["dropped"], "#f9a825"),
    )
    left = [0.0] * len(clients)
    for label, widths, colour in parts:
        ax.barh(ys, widths, left=left, color=colour, label=label)
        left = [a + b for a, b in zip(left, widths)]
    ax.set_yticks(ys, [_plot_label(c.get("client_id", "?")) for c in clients], fontsize=PLOT_FONT)
    ax.tick_params(labelsize=PLOT_FONT)
    ax.margins(y=0.01)
    ax.invert_yaxis()
    ax.set_xlabel("rounds", fontsize=PLOT_FONT)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=PLOT_FONT, ncols=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    return fig
