"""API keys of ``captioner serve``: read from a file, checked in constant time, never logged.

The key file holds one key per line (blank lines and ``#`` comments are skipped). A request
proves it holds a key with ``Authorization: Bearer KEY``.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from captioner.errors import CaptionerError

KEY_FILE_ENV = "CAPTIONER_API_KEY_FILE"  # where --api-key-file is not given
MIN_KEY_CHARS = 16
MAX_KEY_CHARS = 512
MAX_KEYS = 10_000
CHALLENGE = 'Bearer realm="captioner"'  # the WWW-Authenticate header of a 401


class ApiKeys:
    """The accepted keys; :meth:`allows` compares an ``Authorization`` header with every key."""

    def __init__(self, keys: list[str]):
        if not keys:
            raise ValueError("at least one key is needed")
        self._keys = [k.encode() for k in keys]

    def __len__(self) -> int:
        return len(self._keys)

    def allows(self, authorization: bytes | None) -> bool:
        """True when ``authorization`` is ``Bearer <one of the keys>``; the time taken does not
        depend on which key (if any) matched or where the first difference is."""
        scheme, _, given = (authorization or b"").partition(b" ")
        given = given.strip()
        matched = False
        for key in self._keys:  # every key is compared, no early exit
            matched |= hmac.compare_digest(given, key)
        return matched and scheme.lower() == b"bearer"


def load_keys(path: str | os.PathLike) -> ApiKeys:
    """The keys of ``path``; CaptionerError (one line naming the file) for a missing or
    unreadable file, no keys, or a key that is too short, too long or not printable ASCII."""
    path = Path(path)
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise CaptionerError(f"API key file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CaptionerError(f"API key file {path} cannot be read ({exc}); it holds one "
                             "printable ASCII key per line") from None
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        key = line.strip()
        if not key or key.startswith("#"):
            continue
        if not (MIN_KEY_CHARS <= len(key) <= MAX_KEY_CHARS) or not all(
                33 <= ord(c) < 127 for c in key):
            raise CaptionerError(
                f"{path}:{number}: a key must be {MIN_KEY_CHARS} to {MAX_KEY_CHARS} printable "
                "characters without spaces (make one with: python -c \"import secrets; "
                "print(secrets.token_urlsafe(32))\")")
        keys.append(key)
    if not keys:
        raise CaptionerError(f"API key file {path} holds no key; write one key per line")
    if len(keys) > MAX_KEYS:
        raise CaptionerError(f"API key file {path} holds {len(keys)} keys; at most {MAX_KEYS}")
    return ApiKeys(keys)
