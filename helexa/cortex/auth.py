"""Who may call the gateway: API keys for the model routes, the admin key for ``/admin/*``.

Pure decisions over headers; the app renders a refusal in the route's dialect. Keys are
accepted the way each SDK sends them (OpenAI: ``Authorization: Bearer``; Anthropic:
``x-api-key``) and compared in constant time against every configured key, so neither the
timing nor the number of comparisons says which key came close.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from helexa.config import GatewaySettings

OPEN_PATHS = frozenset({"/health"})  # for load balancers and `helexa status` probes


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a client sent: ``x-api-key``, else an ``Authorization: Bearer`` token."""
    if key := headers.get("x-api-key"):
        return key.strip()
    scheme, _, token = (headers.get("Authorization") or "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def matches(presented: str | None, keys: Sequence[str]) -> bool:
    """Constant-time membership: every key is compared, whatever matched first. An empty
    key never matches, so a blank entry in the config cannot open the gateway."""
    candidate = (presented or "").encode()
    found = False
    for key in keys:
        found |= hmac.compare_digest(candidate, key.encode())
    return found and bool(presented)


@dataclass(frozen=True)
class KeyPolicy:
    """The keys each kind of route needs; an empty list means open.

    ``/admin/*`` takes the admin key when one is set; without one it takes the same keys
    as the API, so a keyed gateway never leaves its admin routes open to anyone.
    """

    api_keys: tuple[str, ...] = ()
    admin_key: str | None = None

    @classmethod
    def from_settings(cls, gateway: GatewaySettings) -> KeyPolicy:
        return cls(tuple(gateway.api_keys), gateway.admin_key)

    def keys_for(self, path: str) -> tuple[str, ...]:
        if path in OPEN_PATHS:
            return ()
        if path.startswith("/admin/") and self.admin_key:
            return (self.admin_key,)
        return self.api_keys

    def refusal(self, path: str, headers: Mapping[str, str]) -> str | None:
        """Why this request may not proceed, or None when it may."""
        keys = self.keys_for(path)
        if not keys:
            return None
        presented = presented_key(headers)
        if presented is None:
            return "missing API key: send it as 'Authorization: Bearer <key>' or 'x-api-key'"
        if not matches(presented, keys):
            admin = path.startswith("/admin/") and self.admin_key
            return "invalid admin key" if admin else "invalid API key"
        return None
