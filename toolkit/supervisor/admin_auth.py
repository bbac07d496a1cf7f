"""The header secret that guards Triton's model-control API.

Triton runs with explicit model control: whoever reaches its repository API can load a model from
uploaded files (a python-backend ``model.py`` is code) or unload the served one. ``toolkit serve``
starts Triton with these protocols restricted (``--grpc-restricted-protocol`` /
``--http-restricted-api``) to callers that send :data:`ADMIN_HEADER` with a secret generated for
that run, and hands the secret to the gateway alone (``GATEWAY_TRITON_ADMIN_KEY``). Inference,
health and metadata stay open to the gateway's ordinary calls.
"""

from __future__ import annotations

import secrets

ADMIN_HEADER = "toolkit-admin-key"
# Triton prefixes the gRPC metadata key (Triton 2.51: "expecting header 'triton-grpc-protocol-<key>'").
GRPC_ADMIN_HEADER = f"triton-grpc-protocol-{ADMIN_HEADER}"
# model-repository: load/unload (code execution through uploaded files); logging: can move the log file;
# shared-memory: registers memory regions; trace: changes trace files. None of these is needed to serve.
RESTRICTED_PROTOCOLS = ("model-repository", "shared-memory", "trace", "logging")


def new_admin_key() -> str:
    """A fresh secret for one Triton run (256 bits, URL-safe so it survives a command line and a header)."""
    return secrets.token_urlsafe(32)


def restricted_flags(admin_key: str) -> list[str]:
    """tritonserver flags that restrict :data:`RESTRICTED_PROTOCOLS` to callers sending the key."""
    protocols = ",".join(RESTRICTED_PROTOCOLS)
    return [f"--grpc-restricted-protocol={protocols}:{ADMIN_HEADER}={admin_key}",
            f"--http-restricted-api={protocols}:{ADMIN_HEADER}={admin_key}"]


def grpc_admin_headers(admin_key: str | None) -> dict[str, str] | None:
    """gRPC metadata for a restricted call; None when no key is set (an unrestricted Triton)."""
    return {GRPC_ADMIN_HEADER: admin_key} if admin_key else None
