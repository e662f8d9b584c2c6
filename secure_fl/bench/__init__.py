"""Evaluation harnesses behind ``secure-fl bench``: each runs real simulations and writes a table.

`secure_fl.bench.robustness`: defenses x attacks x secure modes (``secure-fl bench robustness``).
"""

from __future__ import annotations
