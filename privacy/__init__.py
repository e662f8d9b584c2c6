"""Differential-privacy mechanisms, accountants, the privacy ledger and audit reports.

Depends on numpy, torch and opacus only; never imports ``secure_fl``, ``robustness`` or
``protocols``.
"""
