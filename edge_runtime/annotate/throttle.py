"""Failed-token throttle for the caregiver page: exponential lockout per client (no flask here).

A 4-digit PIN fell to 7,433 guesses in 6.9 s. Tokens are now long (``token_problem``), and a
client that presents wrong ones is locked out for a time that doubles with every further
failure: ``free`` mistakes cost nothing (a typo, a stale bookmark), then 1 s, 2 s, 4 s, ... up
to ``max_lockout_s``. A right token clears the client's record. Clients are keyed by address,
IPv6 by its /64 (one host owns a whole /64 and could rotate through it). The table is bounded
(oldest records go first), so a flood of addresses cannot grow memory.
"""
from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

MIN_TOKEN_CHARS = 16
MIN_TOKEN_DISTINCT = 6


def token_problem(token: str) -> str | None:
    """Why ``token`` is too weak to guard the page, or None. At least 16 characters of at least
    6 different ones (the generated token: 32 of the URL-safe alphabet, 192 bits)."""
    if len(token) < MIN_TOKEN_CHARS:
        return f"the annotation token must be at least {MIN_TOKEN_CHARS} characters (got {len(token)}); omit --token to get a strong one"
    if len(set(token)) < MIN_TOKEN_DISTINCT:
        return f"the annotation token must mix at least {MIN_TOKEN_DISTINCT} different characters; omit --token to get a strong one"
    return None


def client_key(address: str | None) -> str:
    """An IPv4 address as is, an IPv6 address by its /64 network."""
    try:
        ip = ipaddress.ip_address((address or "").split("%")[0])
    except ValueError:
        return address or "?"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{ip}/64", strict=False))
    return str(ip)


@dataclass
class _Record:
    failures: int = 0
    locked_until: float = 0.0


class FailureThrottle:
    """Counts wrong tokens per client; ``retry_after`` says how long a client must wait."""

    def __init__(self, *, free: int = 5, base_s: float = 1.0, max_lockout_s: float = 900.0, max_clients: int = 4096,
                 clock: Callable[[], float] = time.monotonic):
        self.free = free
        self.base_s = base_s
        self.max_lockout_s = max_lockout_s
        self.max_clients = max_clients
        self.clock = clock
        self._records: OrderedDict[str, _Record] = OrderedDict()
        self._lock = threading.Lock()

    def retry_after(self, address: str | None) -> float:
        """Seconds until this client may try a token again (0: now)."""
        with self._lock:
            record = self._records.get(client_key(address))
            return 0.0 if record is None else max(0.0, record.locked_until - self.clock())

    def failed(self, address: str | None) -> float:
        """Record a wrong token; returns the lockout it earned (0 while within ``free``)."""
        key = client_key(address)
        with self._lock:
            record = self._records.pop(key, None) or _Record()
            self._records[key] = record  # most recent last
            while len(self._records) > self.max_clients:
                self._records.popitem(last=False)
            record.failures += 1
            over = record.failures - self.free
            lockout = 0.0 if over <= 0 else min(self.max_lockout_s, self.base_s * 2.0 ** (over - 1))
            record.locked_until = self.clock() + lockout
            return lockout

    def succeeded(self, address: str | None) -> None:
        """A right token: this client starts clean."""
        with self._lock:
            self._records.pop(client_key(address), None)
