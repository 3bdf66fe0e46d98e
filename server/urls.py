"""Backend URLs in messages and logs: passwords and secret-looking query values masked.

Standard library only, so that every backend module (broker, cache, storage, database)
and the command line can use it.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

_SECRET_PARAM = re.compile(
    r"(^|&)([^=&]*(?:password|passwd|secret|token|key|credential|sig)[^=&]*)=[^&]*", re.IGNORECASE
)


def redact_url(url: str) -> str:
    """``url`` with its password, and the values of query parameters named like secrets
    (``password``, ``token``, ``secret_key``...), replaced by ``***`` (for messages and logs).
    The rest is kept as it was; an unparsable URL becomes ``<unparsable URL>``."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparsable URL>"
    out = url
    if password is not None:
        host = parts.netloc.rsplit("@", 1)[1]
        out = urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
    if parts.query:
        head, mark, rest = out.partition("?")
        query, hash_, fragment = rest.partition("#")
        out = head + mark + _SECRET_PARAM.sub(r"\1\2=***", query) + hash_ + fragment
    return out
