"""The one scrubber: what must never reach a log line, an MLflow param or tag, an error message, an
index or a checkpoint. Credentials come from the standard places (instance roles, ``AWS_*``,
profiles, Kubernetes secrets); a URL a user typed may still carry one (user info, a pre-signed
query) and is redacted here before it is shown or stored.

    redact("s3://key:secret@bucket/x?X-Amz-Signature=abc")   -> "s3://***@bucket/x?X-Amz-Signature=***"
    redact_values({"token": "t", "url": "https://u:p@h/"})   -> {"token": "***", "url": "https://***@h/"}
"""
from __future__ import annotations

import re
from typing import Any

_SECRET_KEY = re.compile(r"(secret|password|passwd|token|credential|api[_-]?key|access[_-]?key|auth)", re.I)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.I)
# query parameters that carry a credential: pre-signed S3 / GCS URLs, Azure SAS, bearer tokens
_QUERY_CREDENTIALS = re.compile(
    r"(?P<name>[?&;](?:X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|X-Goog-Signature|"
    r"X-Goog-Credential|Signature|AWSAccessKeyId|x-amz-security-token|sig|token|access_token|"
    r"api_key|apikey|key|password|secret)=)[^&#\s'\"]*", re.I)


def redact(text: str) -> str:
    """``text`` with URL user info and credential-bearing query values replaced by '***'."""
    text = _URL_USERINFO.sub(r"\g<scheme>***@", text)
    return _QUERY_CREDENTIALS.sub(r"\g<name>***", text)


def redact_values(value: Any, key: str = "") -> Any:
    """A JSON-like value with every credential-named key's value replaced by '***' and every
    string ``redact``-ed, recursively."""
    if _SECRET_KEY.search(key):
        return "***"
    if isinstance(value, dict):
        return {k: redact_values(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_values(v, key) for v in value]
    if isinstance(value, str):
        return redact(value)
    return value
