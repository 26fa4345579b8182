"""Bearer tokens of the public endpoint: the token file, its reload, and the constant-time check.

``TokenAuth`` holds the accepted tokens (one per line of a file; blank lines and ``#`` comments skipped)
and answers one question, ``check(header) -> bool``, for the value of an ``authorization`` header or
metadata entry (``Bearer TOKEN``). It imports nothing of gRPC, so every front end of the scheduler uses
the same object: the gRPC interceptor (``asap.rpc.auth``) and an HTTP endpoint alike::

    auth = TokenAuth.from_file(path)
    if not auth.check(request.headers.get("authorization")):
        ...  # 401, saying nothing else

Every accepted token is compared with ``hmac.compare_digest`` and the loop never stops early, so the
time taken does not tell how close a guess was nor which token matched. Tokens never reach a log line or
an error message: ``repr`` shows the file and the count only.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path

from asap.errors import InvalidArgument

__all__ = ["AUTHORIZATION", "TokenAuth", "bearer", "read_tokens"]

logger = logging.getLogger(__name__)

AUTHORIZATION = "authorization"
"""The header (HTTP) and metadata key (gRPC, lower case) that carries ``Bearer TOKEN``."""
_SCHEME = "bearer"


def bearer(token: str) -> str:
    """The ``authorization`` value a client sends for ``token``."""
    return f"Bearer {token}"


def read_tokens(path: str | Path) -> tuple[bytes, ...]:
    """The tokens in ``path``, one per line; ``InvalidArgument`` if it cannot be read or holds none."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"cannot read the token file {path}: {exc}") from exc
    tokens = tuple(
        line.strip().encode()
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    if not tokens:
        raise InvalidArgument(f"the token file {path} holds no token")
    return tokens


class TokenAuth:
    """The accepted bearer tokens, read from ``path``; ``reload()`` re-reads it (the scheduler calls it
    on SIGHUP). A reload swaps the whole set at once, so a check never sees half of it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._tokens = read_tokens(self.path)

    @classmethod
    def from_file(cls, path: str | Path) -> TokenAuth:
        """Read the tokens of ``path`` (``InvalidArgument`` if unreadable or empty)."""
        return cls(path)

    def __repr__(self) -> str:
        return f"TokenAuth({str(self.path)!r}, {len(self._tokens)} tokens)"

    @property
    def count(self) -> int:
        """How many tokens are accepted now."""
        return len(self._tokens)

    def reload(self) -> bool:
        """Re-read the file. On failure (unreadable, or no token left) the tokens accepted so far stay
        and a warning says why; returns whether the new set is in force."""
        try:
            tokens = read_tokens(self.path)
        except InvalidArgument as exc:
            logger.warning("token reload failed, keeping %d tokens: %s", len(self._tokens), exc.message)
            return False
        self._tokens = tokens  # one reference swap: a concurrent check sees the old set or the new
        logger.info("token file %s reloaded: %d tokens", self.path, len(tokens))
        return True

    def check(self, header: str | bytes | None) -> bool:
        """Whether ``header`` (an ``authorization`` value, None when absent) is ``Bearer`` and one of the
        accepted tokens. Constant time in the candidate: every token is compared, none skipped."""
        if header is None:
            return False
        raw = header.encode() if isinstance(header, str) else header
        scheme, _, candidate = raw.strip().partition(b" ")
        candidate = candidate.strip()
        if scheme.lower() != _SCHEME.encode() or not candidate:
            return False
        accepted = False
        for token in self._tokens:
            accepted |= hmac.compare_digest(candidate, token)
        return accepted
