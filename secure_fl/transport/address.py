"""Addresses (``HOST:PORT``) and client ids as users type them on the command line and in the API.

Both are checked before anything connects or is written, so a typo is one clear ``ValueError``
(exit status 2 on the command line), not a random port or a refusal after a long wait.
"""

from __future__ import annotations

from protocols.errors import MalformedMessage
from protocols.wire.limits import check_client_id

__all__ = ["check_id", "parse_address"]


def check_id(client_id: str, *, what: str = "client id") -> str:
    """Return ``client_id`` if the server would accept it at Join; else raise ``ValueError`` saying why."""
    try:
        return check_client_id(client_id, field=what)
    except MalformedMessage as exc:
        raise ValueError(str(exc)) from None


def parse_address(address: str, *, what: str = "address", allow_port_zero: bool = False) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` for IPv6) and check the port; raise ``ValueError`` naming ``what``.

    gRPC silently listens on a random port for an out-of-range one (``127.0.0.1:99999``), so the
    port is checked here: an integer in 1-65535, or 0 (any free port) where ``allow_port_zero``.
    """
    host, sep, port_text = address.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{what} {address!r} must look like HOST:PORT, e.g. 127.0.0.1:50051")
    if host.startswith("[") != host.endswith("]"):
        raise ValueError(f"{what} {address!r}: unbalanced brackets around the IPv6 host")
    try:
        port = int(port_text, 10)
    except ValueError:
        raise ValueError(f"{what} {address!r}: port {port_text!r} is not a number") from None
    low = 0 if allow_port_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"{what} {address!r}: port {port} is out of range ({low}-65535)")
    return host, port
