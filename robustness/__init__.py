"""Byzantine-robust aggregation, reputation, rank voting and attacks for evaluation.

Depends on numpy and torch only; never imports ``secure_fl``, ``privacy`` or ``protocols``.
"""
