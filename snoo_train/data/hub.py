"""Reaching the Hugging Face hub, or knowing at once that we cannot.

Without a network, `transformers` and `datasets` retry for tens of seconds and end in a
traceback. Before asking them for anything that is not on local disk, we ask the operating
system whether the hub's host answers at all (a TCP connect with a short timeout): a missing
name or a closed network fails in milliseconds, with one line that says what to do.
"""

from __future__ import annotations

import socket
from urllib.parse import urlparse

from huggingface_hub import constants

PROBE_TIMEOUT_S = 3.0


def hub_offline() -> bool:
    """HF_HUB_OFFLINE, as the hub library itself reads it: the local cache only, no network."""
    return constants.is_offline_mode()


def hub_unreachable(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None if the hub's host (HF_ENDPOINT, as the hub library reads it) accepts a connection;
    otherwise why not, in a few words."""
    url = urlparse(constants.ENDPOINT)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
        return f"{constants.ENDPOINT} is unreachable ({reason})"
