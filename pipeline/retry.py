"""The one retry loop: a call retried with exponential backoff and jitter while a service (object
storage, the tracking server) is unreachable, for up to ``RetryPolicy.timeout_s`` after the first
failure, so an outage of a few minutes is ridden out instead of failing a step.

    call_with_retry(upload, RetryPolicy(timeout_s=600), retry_on=lambda e: True,
                    announce=say, service="storage", doing="uploading checkpoint_00000006")

With ``announce`` the first failure and the recovery are each said once (never every attempt).
"""
from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

_NOT_TRANSIENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: retried for up to ``timeout_s`` after the first failure,
    and at most ``attempts`` tries in all when that is set."""

    attempts: int | None = None
    initial_delay_s: float = 0.5
    max_delay_s: float = 15.0
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.attempts is not None and self.attempts < 1:
            raise ValueError(f"attempts must be >= 1 or None, got {self.attempts}")
        if self.timeout_s < 0 or self.initial_delay_s < 0 or self.max_delay_s < 0:
            raise ValueError("timeout_s, initial_delay_s and max_delay_s must be >= 0")

    def delays(self) -> Iterator[float]:
        """The waits before each retry; the clock starts at the first ``next`` (the first failure)."""
        deadline = time.monotonic() + self.timeout_s
        delay = self.initial_delay_s
        tries = itertools.count(2)
        while self.attempts is None or next(tries) <= self.attempts:
            wait = delay * (0.75 + 0.5 * random.random())
            if time.monotonic() + wait > deadline:
                return
            yield wait
            delay = min(delay * 2, self.max_delay_s)


def is_transient(exc: BaseException) -> bool:
    """Whether retrying can help: network and server-side errors yes, missing objects no."""
    if isinstance(exc, _NOT_TRANSIENT):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    try:
        import botocore.exceptions as bce

        if isinstance(exc, (bce.HTTPClientError, bce.ConnectionError, bce.IncompleteReadError)):
            return True
    except ImportError:  # pragma: no cover - s3fs always brings botocore
        pass
    try:
        import aiohttp

        if isinstance(exc, aiohttp.ClientError):
            return True
    except ImportError:  # pragma: no cover
        pass
    # s3fs maps throttling / 5xx responses to plain OSError.
    return type(exc) is OSError


def call_with_retry(fn: Callable[[], T], policy: RetryPolicy, *,
                    retry_on: Callable[[BaseException], bool] = is_transient,
                    announce: Callable[[str], None] | None = None, service: str = "storage",
                    doing: str = "") -> T:
    """``fn()``, retried per ``policy`` on the errors ``retry_on`` accepts; the last error
    propagates. ``announce`` gets one line at the first failure ("<service> unreachable while
    <doing> (...); retrying for up to N s") and one when a retry succeeds ("<service> back after N s:
    <doing> done")."""
    delays = policy.delays()
    failed_at: float | None = None
    while True:
        try:
            result = fn()
        except Exception as exc:
            delay = next(delays, None) if retry_on(exc) else None
            if delay is None:
                raise
            if failed_at is None:
                failed_at = time.monotonic()
                if announce is not None:
                    announce(f"{service} unreachable{f' while {doing}' if doing else ''} "
                             f"({type(exc).__name__}); retrying for up to {policy.timeout_s:.0f} s")
            time.sleep(delay)
            continue
        if failed_at is not None and announce is not None:
            announce(f"{service} back after {time.monotonic() - failed_at:.0f} s"
                     f"{f': {doing} done' if doing else ''}")
        return result
