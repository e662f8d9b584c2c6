"""The compatibility matrix of PEFT rule x secure mode x privacy mode, computed from the real checks.

Nothing here decides what is allowed: `compatibility` builds the stages of every combination
with `secure_fl.stages.Stages.from_config` (the check every run goes through at start) and records
whether it is accepted and, if not, the refusal and the key it names. docs/peft.md holds the
table `matrix_markdown` prints (a test regenerates it), so the documentation cannot drift from
what the code refuses.

Run:  python -m secure_fl.peft_agg.compat    # prints the Markdown table
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from secure_fl.config import Config, load_preset
from secure_fl.errors import ConfigError

#: The secure and privacy modes the matrix covers (the built-in ones), in display order.
SECURE_MODES = ("plain", "secagg+", "bfv", "ckks")
PRIVACY_MODES = ("none", "central", "distributed", "dp-sgd")


@dataclass(frozen=True)
class Combination:
    """One cell: whether ``rule`` runs under ``secure`` x ``privacy``, and if not, why (and the key named)."""

    rule: str
    secure: str
    privacy: str
    accepted: bool
    key: str | None = None
    reason: str = ""


def compatibility(rules: Sequence[str] | None = None, base: Config | None = None) -> list[Combination]:
    """Every combination of the built-in rules (or ``rules``) with `SECURE_MODES` x `PRIVACY_MODES`.

    ``base`` is the configuration the modes are set on (default: the smoke preset); each mode
    runs with its default settings.
    """
    from secure_fl.peft_agg.registry import available
    from secure_fl.stages import Stages

    base = base or load_preset("smoke")
    out = []
    for rule in rules or available():
        for secure in SECURE_MODES:
            for privacy in PRIVACY_MODES:
                config = base.with_overrides([f"peft.rule={rule!r}", f"secure.mode={secure!r}", f"privacy.mode={privacy!r}"])
                try:
                    Stages.from_config(config)
                except ConfigError as exc:
                    out.append(Combination(rule, secure, privacy, False, exc.key, str(exc)))
                else:
                    out.append(Combination(rule, secure, privacy, True))
    return out


def matrix_markdown(combinations: Sequence[Combination] | None = None) -> str:
    """The matrix as a Markdown table: one row per rule and secure mode, one column per privacy mode.

    An accepted cell reads ``yes``; a refused one ``no`` and the key the refusal names.
    """
    cells = list(combinations if combinations is not None else compatibility())
    lines = ["| rule | secure.mode | " + " | ".join(f"privacy.mode = {p}" for p in PRIVACY_MODES) + " |",
             "|---|---|" + "---|" * len(PRIVACY_MODES)]
    rules = list(dict.fromkeys(c.rule for c in cells))
    for rule in rules:
        for secure in SECURE_MODES:
            row = {c.privacy: c for c in cells if c.rule == rule and c.secure == secure}
            shown = [("yes" if row[p].accepted else f"no (`{row[p].key}`)") if p in row else "" for p in PRIVACY_MODES]
            lines.append(f"| `{rule}` | `{secure}` | " + " | ".join(shown) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover
    print(matrix_markdown(), end="")
