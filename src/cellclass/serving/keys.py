"""API keys with roles, stored hashed.

A key reads ``cc_<key id>_<secret>``: the key id (8 hex digits, public) finds the row, the
secret (32 random bytes, URL-safe base64) proves possession. Only a salted SHA-256 of the
secret is stored, with a salt per key; a database leak reveals no usable key. (A slow
password hash such as scrypt buys nothing for 256-bit random secrets and would cost
tens of milliseconds on every request.)

Roles are ordered: ``curate`` may do everything ``contribute`` may, which may do
everything ``predict`` may.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import dataclass

from cellclass.errors import AuthenticationError, NotFoundError, PermissionDeniedError, ServiceError
from cellclass.serving.database import Database

log = logging.getLogger(__name__)

ROLES = ("predict", "contribute", "curate")
"""Key roles, weakest first; each role includes the ones before it."""

KEY_ID_PATTERN = "^[0-9a-f]{8}$"
"""What a key id looks like (the public part of a key, recorded as a contribution's contributor)."""

_KEY = re.compile(r"^cc_([0-9a-f]{8})_([A-Za-z0-9_-]{20,})$")


@dataclass(frozen=True)
class ApiKey:
    """A key's public record (never its secret).

    Attributes:
        key_id: Public identifier, also recorded as a contribution's contributor.
        role: ``predict``, ``contribute`` or ``curate``.
        name: Free text: who or what holds the key.
        created_at: ISO 8601 UTC time of creation.
        revoked_at: ISO 8601 UTC time of revocation, or None while valid.
    """

    key_id: str
    role: str
    name: str
    created_at: str
    revoked_at: str | None = None

    def allows(self, role: str) -> bool:
        """Whether this key's role includes ``role``."""
        return ROLES.index(self.role) >= ROLES.index(role)


def now() -> str:
    """The current UTC time, ISO 8601 with microseconds (sorts as text)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


def _digest(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode("utf-8")).hexdigest()


def check_role(role: str) -> str:
    """Return ``role`` if valid.

    Raises:
        ServiceError: When it is not one of :data:`ROLES`.
    """
    if role not in ROLES:
        raise ServiceError(f"unknown key role {role!r}; valid: {', '.join(ROLES)}")
    return role


class KeyStore:
    """Create, list, revoke and verify API keys in a :class:`Database`."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, role: str, name: str = "") -> tuple[str, ApiKey]:
        """Make a key; return ``(key, record)``. The key is shown once and never stored."""
        check_role(role)
        for _ in range(5):  # a clash of 32-bit ids is rare; retry with a fresh one
            key_id = secrets.token_hex(4)
            secret = secrets.token_urlsafe(32)
            salt = secrets.token_hex(16)
            created = now()
            with self.db.transaction() as tx:
                if tx.execute("SELECT key_id FROM api_keys WHERE key_id = ?", (key_id,)):
                    continue
                tx.execute(
                    "INSERT INTO api_keys (key_id, role, name, salt, digest, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (key_id, role, name, salt, _digest(salt, secret), created),
                )
            log.debug("created %s key %s (%s)", role, key_id, name or "no name")
            return f"cc_{key_id}_{secret}", ApiKey(key_id, role, name, created)
        raise ServiceError("could not draw an unused key id in 5 tries; try again")

    def list(self) -> list[ApiKey]:
        """Every key, revoked ones included, oldest first."""
        rows = self.db.query(
            "SELECT key_id, role, name, created_at, revoked_at FROM api_keys ORDER BY created_at, key_id"
        )
        return [ApiKey(**row) for row in rows]

    def revoke(self, key_id: str) -> ApiKey:
        """Revoke a key by its id (or the whole key); revoking twice is harmless.

        Raises:
            NotFoundError: When no key has that id.
        """
        match = _KEY.match(key_id)
        key_id = match.group(1) if match else key_id
        with self.db.transaction() as tx:
            rows = tx.execute("SELECT key_id, role, name, created_at, revoked_at FROM api_keys "
                              "WHERE key_id = ?", (key_id,))
            if not rows:
                known = ", ".join(k.key_id for k in self.list()) or "(none)"
                raise NotFoundError(f"no API key with id {key_id!r}; known ids: {known}")
            if rows[0]["revoked_at"] is None:
                rows[0]["revoked_at"] = now()
                tx.execute("UPDATE api_keys SET revoked_at = ? WHERE key_id = ?",
                           (rows[0]["revoked_at"], key_id))
        return ApiKey(**rows[0])

    def verify(self, key: str | None, role: str) -> ApiKey:
        """The record of a valid key whose role includes ``role``.

        Raises:
            AuthenticationError: When ``key`` is missing, malformed, unknown or revoked.
            PermissionDeniedError: When the key's role does not include ``role``.
        """
        if not key:
            raise AuthenticationError(
                f"this operation needs an API key with role {role!r} or above, got none; send "
                f"'Authorization: Bearer KEY' (make one with `cellclass keys create --role {role}`)"
            )
        match = _KEY.match(key.strip())
        if not match:
            raise AuthenticationError(
                "malformed API key; valid: 'cc_<8 hex digits>_<secret>' as printed by "
                "`cellclass keys create`"
            )
        key_id, secret = match.groups()
        rows = self.db.query("SELECT key_id, role, name, created_at, revoked_at, salt, digest "
                             "FROM api_keys WHERE key_id = ?", (key_id,))
        if not rows or not hmac.compare_digest(rows[0]["digest"], _digest(rows[0]["salt"], secret)):
            raise AuthenticationError(f"unknown API key (id {key_id}); check the key or make a new one")
        row = rows[0]
        if row["revoked_at"] is not None:
            raise AuthenticationError(f"API key {key_id} was revoked at {row['revoked_at']}")
        record = ApiKey(row["key_id"], row["role"], row["name"], row["created_at"])
        if not record.allows(role):
            allowed = ", ".join(ROLES[ROLES.index(role):])
            raise PermissionDeniedError(
                f"API key {key_id} has role {record.role!r}, which may not do this; "
                f"valid roles: {allowed}"
            )
        return record
