"""Bearer-token authentication for ``vaegan.v1`` calls (``--auth-tokens FILE``).

The file holds SHA-256 hex digests of the accepted tokens, one per line (``#`` comments and
blank lines skipped; an optional ``name:`` prefix labels a token in the file only). The server
never sees or stores a token in clear: it hashes what a call presents (``authorization: Bearer
TOKEN`` metadata) and compares the digest with every accepted one in constant time. Health and
reflection are separate services and stay open (Kubernetes probes carry no token). Tokens are
never logged; a refused call is UNAUTHENTICATED and counted like any other.

    printf %s "$TOKEN" | sha256sum | cut -d' ' -f1 >> tokens.txt
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vaegan.service.runtime.errors import Unauthenticated

__all__ = ["BasicAuth", "TokenSet", "hash_token"]

_HEX = re.compile(r"^[0-9a-f]{64}$")


def hash_token(token: str) -> str:
    """The SHA-256 hex digest the tokens file holds for ``token``."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class TokenSet:
    """The accepted token digests."""

    def __init__(self, digests: Iterable[str]) -> None:
        self.digests = [bytes.fromhex(d) for d in digests]
        if not self.digests:
            raise ValueError("auth_tokens_file: no token digests in it")

    @classmethod
    def load(cls, path: Path) -> TokenSet:
        """Read a tokens file; a line that is not a SHA-256 hex digest is an error naming it."""
        digests = []
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            digest = text.rsplit(":", 1)[-1].strip().lower()
            if not _HEX.match(digest):
                raise ValueError(f"auth_tokens_file {path}: line {n} is not a SHA-256 hex digest (64 hex digits)")
            digests.append(digest)
        return cls(digests)

    def check(self, metadata: Any) -> None:
        """Raise :class:`Unauthenticated` unless ``metadata`` carries an accepted bearer token."""
        presented = None
        for key, value in metadata or ():
            if key == "authorization" and isinstance(value, str) and value[:7].lower() == "bearer ":
                presented = value[7:].strip()
        if not presented:
            raise Unauthenticated("this server needs a bearer token: send 'authorization: Bearer <token>' metadata")
        digest = hashlib.sha256(presented.encode("utf-8")).digest()
        ok = False
        for accepted in self.digests:  # every digest compared: the time does not say which matched
            ok |= hmac.compare_digest(digest, accepted)
        if not ok:
            raise Unauthenticated("the bearer token is not accepted by this server")


class BasicAuth:
    """HTTP basic auth for ``/metrics`` (``--metrics-basic-auth-file``).

    The file holds ``user:<SHA-256 hex of the password>`` lines (``#`` comments and blank lines
    skipped). A plain SHA-256 is no password hash: use long random passwords, as a scraper's
    secret is anyway. Every entry is compared in constant time, whichever user is named.

        printf 'prometheus:%s\\n' "$(printf %s "$PASSWORD" | sha256sum | cut -d' ' -f1)" > metrics-users.txt
    """

    def __init__(self, users: dict[str, str]) -> None:
        if not users:
            raise ValueError("metrics_basic_auth_file: no user:digest lines in it")
        self.entries = [(hashlib.sha256(u.encode()).digest(), bytes.fromhex(d)) for u, d in users.items()]

    @classmethod
    def load(cls, path: Path) -> BasicAuth:
        users = {}
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            user, _, digest = text.rpartition(":")
            digest = digest.strip().lower()
            if not user or ":" in user or not _HEX.match(digest):
                raise ValueError(
                    f"metrics_basic_auth_file {path}: line {n} is not 'user:<SHA-256 hex of the password>'"
                )
            users[user.strip()] = digest
        return cls(users)

    def check(self, header: str | None) -> bool:
        """True when ``header`` (an Authorization value) names a user with its password."""
        if not header or header[:6].lower() != "basic ":
            return False
        try:
            user, sep, password = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        if not sep:
            return False
        u = hashlib.sha256(user.encode()).digest()
        p = hashlib.sha256(password.encode()).digest()
        ok = False
        for eu, ep in self.entries:
            ok |= hmac.compare_digest(u, eu) & hmac.compare_digest(p, ep)
        return ok
