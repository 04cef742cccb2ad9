"""Object-storage access for shards: fsspec opening and URL helpers.

Credentials and endpoints come from the standard places only (AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS profiles, instance roles), resolved by fsspec/s3fs
the same way for the writer and the reader. Nothing here logs or stores them: URLs that reach a
log, an index or an error message go through ``pipeline.redact.redact``; transient errors are
retried by ``pipeline.retry``.
"""
from __future__ import annotations

import importlib
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import PipelineError


class DataError(PipelineError, RuntimeError):
    """Bad data the pipeline refuses to train on silently (skip budget exceeded, checksum mismatch,
    unreadable index, unusable source)."""


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


def open_file(url: str, mode: str = "rb", storage_options: dict[str, Any] | None = None,
              block_size: int | None = None) -> IO[bytes]:
    """Open ``url`` through fsspec; parent folders are created for local writes. ``block_size``:
    the read-ahead buffer of an object-storage file (s3fs: 50 MB by default)."""
    fs, path = url_to_fs(url, storage_options)
    if "w" in mode and isinstance(fs, LocalFileSystem):
        fs.makedirs(fs._parent(path), exist_ok=True)
    return fs.open(path, mode) if block_size is None else fs.open(path, mode, block_size=block_size)


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
