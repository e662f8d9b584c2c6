"""Exceptions raised by the wire protocol and the secure-aggregation protocols.

Every error names what was wrong (which client, which tensor, which field) and carries the gRPC
status code a server should answer with, so the transport can turn it into a clean refusal.
"""

from __future__ import annotations

import grpc


class ProtocolError(Exception):
    """Base class of every protocol error; ``code`` is the gRPC status to report."""

    code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class MalformedMessage(ProtocolError):
    """A message is structurally invalid: bad dtype, shape, size, checksum or chunk order."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class StaleMessage(ProtocolError):
    """A message belongs to another run or to a round that is not open (any more)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class UnknownClient(ProtocolError):
    """A message comes from a client id the server does not know (it never joined or left)."""

    code = grpc.StatusCode.NOT_FOUND


class Impersonation(ProtocolError):
    """A message declares a client id other than the party its connection authenticated as."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Refused(ProtocolError):
    """A well-formed message the server will not accept (not in the cohort, duplicate, ...)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ProtocolAbort(ProtocolError):
    """A protocol instance cannot finish (for example too few clients survived)."""

    code = grpc.StatusCode.ABORTED


class StageTransitionError(ProtocolError):
    """A message or task arrived for a phase the protocol is not in (or never has)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class WrapAround(ProtocolAbort):
    """A modular sum left the range honest inputs can reach: the sum wrapped or a client lied.

    Raised by `protocols.secagg.quantize.check_no_wrap` (and so by `dequantize_sum`) instead of
    returning a silently wrong aggregate; the round's sum cannot be used.
    """

    code = grpc.StatusCode.ABORTED
class InvalidShare(ProtocolError):
    """A secret share, encrypted share or public key fails a check: it does not authenticate
    (tampered bytes, another run, round, bucket, sender or receiver), or the shares handed to
    reconstruction are inconsistent (duplicate x-coordinates, mixed thresholds, too few shares)."""

    code = grpc.StatusCode.INVALID_ARGUMENT
