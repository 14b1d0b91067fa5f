"""Secrets in locations: what is written or printed never holds them.

A shard location may carry credentials: ``https://user:secret@host/shards`` (userinfo) or a presigned URL
(``?X-Amz-Signature=...``, ``?sig=...``, ``?token=...``). The real text stays in memory (the loader needs it);
every config.yaml, summary.json, checkpoint, tracker parameter, log line and error message gets
``redact(text)``: the password and every credential-like query value replaced by ``***``. Credentials
belong in the standard environment instead (``~/.netrc`` for HTTP, ``AWS_*`` / profiles for S3,
``GOOGLE_APPLICATION_CREDENTIALS`` for GCS), which the clients read themselves.
"""

from __future__ import annotations

import re

MASK = "***"
# query parameters that carry a credential: AWS/GCS/Azure presigned URLs, tokens, keys, passwords
SECRET_PARAM = re.compile(
    r"(?i)^(x-amz-(signature|credential|security-token)|x-goog-(signature|credential)|signature|sig|token|"
    r"access[_-]?token|auth|authorization|key|api[_-]?key|password|passwd|secret)$"
)
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^/@:\s]*)(?::(?P<pw>[^/@\s]*))?@")
_QUERY = re.compile(r"(?P<sep>[?&])(?P<name>[^=&#\s]+)=(?P<value>[^&#\s'\"]*)")


def redact(text: str) -> str:
    """``text`` (a URL, or a message or a file holding URLs) with passwords and credential query values
    replaced by ``***``; a user name without a password is kept (it is no secret, and it says whose)."""
    if not isinstance(text, str) or ("@" not in text and "=" not in text):
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@" if m["pw"] is not None else m.group(0), text)
    return _QUERY.sub(
        lambda m: f"{m['sep']}{m['name']}={MASK}" if SECRET_PARAM.match(m["name"]) and m["value"] else m.group(0),
        text,
    )


def redact_tree(obj):
    """Every string in a nested dict/list redacted (configs and summaries as written)."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_tree(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(redact_tree(v) for v in obj)
    return obj
