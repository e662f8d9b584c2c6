"""Secure-aggregation protocols: what a client sends instead of its update, and how the server
turns those messages into sums without seeing individual updates (except in ``plain`` mode).

Each protocol is one file with a client half and a server half plus one line in
`protocols.secagg.registry`.
"""

from protocols.secagg.base import BucketSum, ClientRound, Contribution, SecureAggregation, ServerRound
from protocols.secagg.phases import (
    Answer, AnswerSpec, BlobSpec, ClientContext, Phase, PhaseData, PhaseResult, RoundContext, require_participants,
)
from protocols.secagg.registry import available, create_secure_aggregation, register_secure_aggregation

__all__ = [
    "Answer",
    "AnswerSpec",
    "BlobSpec",
    "BucketSum",
    "ClientContext",
    "ClientRound",
    "Contribution",
    "Phase",
    "PhaseData",
    "PhaseResult",
    "RoundContext",
    "SecureAggregation",
    "ServerRound",
    "require_participants",
    "available",
    "create_secure_aggregation",
    "register_secure_aggregation",
]
