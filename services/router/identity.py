"""Who is calling the router: the identity its rate limit is counted under and its sessions
belong to (issue 15, "who is who").

* With a bearer token configured (`security.auth`), every call that reaches a servicer has
  presented it (the interceptor refuses the others), so the caller is that token's holder:
  `token:<first 12 hex digits of its SHA-256>`, the same on every router replica and never the
  token itself. A token holder may speak for the clients behind it (the gateway does, for its
  HTTP clients) with `x-mirador-client: <name>`; that name is then the identity.
* Without a token nothing is authenticated, so no metadata is believed: the caller is its peer
  address without the port (reconnecting keeps the identity). `x-mirador-client` is ignored:
  a client that could pick its identity could pick a fresh rate-limit bucket or read another
  client's session.
"""

from __future__ import annotations

import hashlib

CLIENT_METADATA_KEY = "x-mirador-client"
MAX_CLIENT_ID_CHARS = 128


def peer_address(context) -> str:
    """The caller's address without its port: "127.0.0.1", "[::1]", "unix:/path"."""
    try:
        peer = context.peer() or ""
    except Exception:  # noqa: BLE001 - no peer known
        peer = ""
    if peer.startswith(("ipv4:", "ipv6:")):  # "ipv4:127.0.0.1:5432", "ipv6:[::1]:5432"
        return peer.partition(":")[2].rpartition(":")[0] or peer
    return peer or "unknown"


def named_client(context) -> str:
    """The `x-mirador-client` value a delegating caller sent, or ""."""
    try:
        for key, value in context.invocation_metadata() or ():
            if key == CLIENT_METADATA_KEY and isinstance(value, str) and value.strip():
                return value.strip()[:MAX_CLIENT_ID_CHARS]
    except Exception:  # noqa: BLE001 - no metadata
        pass
    return ""


class CallerIdentity:
    """`identify(context)` → the caller's identity, as the module docstring says."""

    def __init__(self, bearer_token: str | None = None):
        self.token_identity = (f"token:{hashlib.sha256(bearer_token.encode()).hexdigest()[:12]}"
                               if bearer_token else None)

    def __call__(self, context) -> str:
        if self.token_identity is None:
            return peer_address(context)
        return named_client(context) or self.token_identity
