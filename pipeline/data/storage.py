"""Object-storage access for shards: fsspec opening, URL helpers, retry with backoff.

Credentials and endpoints come from the standard places only (AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS profiles, instance roles), resolved by fsspec/s3fs
the same way for the writer and the reader. Nothing here logs or stores them: URLs that reach a
log, an index or an error message go through ``redact_url``.
"""
from __future__ import annotations

import importlib
import itertools
import random
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import PipelineError

T = TypeVar("T")

_NOT_RETRYABLE = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class DataError(PipelineError, RuntimeError):
    """Bad data the pipeline refuses to train on silently (skip budget exceeded, checksum mismatch,
    unreadable index, unusable source)."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter for transient object-storage errors: retried for up to
    ``timeout_s`` after the first failure (an outage of a few minutes is ridden out), and at most
    ``attempts`` tries in all when that is set."""

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


def is_retryable(exc: BaseException) -> bool:
    """Whether retrying can help: network and server-side errors yes, missing objects no."""
    if isinstance(exc, _NOT_RETRYABLE):
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


def call_with_retry(fn: Callable[[], T], policy: RetryPolicy,
                    on_retry: Callable[[BaseException], None] | None = None,
                    retry_on: Callable[[BaseException], bool] | None = None) -> T:
    """``fn()``, retried per ``policy`` on errors ``retry_on`` accepts (default: transient storage
    errors, ``is_retryable``); the last error propagates. The one retry loop of the pipeline."""
    delays = policy.delays()
    retry_on = retry_on or is_retryable
    while True:
        try:
            return fn()
        except Exception as exc:
            delay = next(delays, None) if retry_on(exc) else None
            if delay is None:
                raise
            if on_retry is not None:
                on_retry(exc)
            time.sleep(delay)


def redact_url(url: str) -> str:
    """``url`` without user info or query string (where presigned credentials would live)."""
    url = re.sub(r"^([a-zA-Z][\w+.-]*://)[^/@]*@", r"\1", url)
    return url.split("?", 1)[0]


def is_url(path: str) -> bool:
    """Whether ``path`` names its filesystem by a scheme (``s3://``, ``gs://``, ``file://``,
    ``memory://``...), i.e. must be opened through fsspec by that protocol, rather than being a
    plain local path. Says nothing about remoteness (``file://`` is a URL here) and nothing about
    ``models:/`` or ``runs:/`` URIs, which have no ``//``. (``pipeline.config.is_remote`` is another
    question - "is this not a local path to make absolute?" - and answers False for ``file://``.)"""
    return "://" in path


def join_url(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def resolve_url(base_dir: str, url: str) -> str:
    """``url`` if absolute (scheme or leading slash), else relative to ``base_dir``."""
    if is_url(url) or url.startswith("/"):
        return url
    return join_url(base_dir, url)


def parent_url(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0]


def url_to_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path


def open_file(url: str, mode: str = "rb", storage_options: dict[str, Any] | None = None) -> IO[bytes]:
    """Open ``url`` through fsspec; parent folders are created for local writes."""
    fs, path = url_to_fs(url, storage_options)
    if "w" in mode and isinstance(fs, LocalFileSystem):
        fs.makedirs(fs._parent(path), exist_ok=True)
    return fs.open(path, mode)


def read_bytes(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    with open_file(url, "rb", storage_options) as f:
        return f.read()


def exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = url_to_fs(url, storage_options)
    return fs.exists(path)


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> IO[bytes]:
    return fsspec.open(url, mode).open()


def register_webdataset_handlers(schemes: tuple[str, ...] = ("s3", "gs", "gcs", "az", "abfs")) -> None:
    """Let ``webdataset`` open object-storage URLs through fsspec (it has no s3:// handler).

    Needed in every process that reads with webdataset, DataLoader workers included; the
    StreamingLoader calls it in its worker_init_fn. ``webdataset.gopen`` the attribute is a
    function, so the module is reached through importlib.
    """
    gopen_module = importlib.import_module("webdataset.gopen")
    for scheme in schemes:
        gopen_module.gopen_schemes[scheme] = _gopen_fsspec
