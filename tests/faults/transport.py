"""What the fault proxy speaks to its clients, plain HTTP or TLS: the session's certificate authority and
contexts, and the check that the daemon spoke what the proxy served.

(Not in conftest.py: pytest imports that as ``faults.conftest`` while the tests import ``tests.faults.conftest``,
two modules; the CA must be one, or a client trusting it would not trust the proxy's certificate.)
"""

from __future__ import annotations

import ssl
from functools import cache

import trustme

from tests.faults.proxy import FaultProxy

#: what the fault proxy speaks to the daemon, in test-id order
TRANSPORTS = ("plain", "tls")


@cache
def tls_authority() -> trustme.CA:
    """The session's CA (one per test process)."""
    return trustme.CA()


@cache
def tls_server_context() -> ssl.SSLContext:
    """The fault proxy's server context in TLS mode: a certificate for 127.0.0.1 from :func:`tls_authority`."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_authority().issue_cert("127.0.0.1").configure_cert(context)
    context.set_alpn_protocols(["http/1.1"])
    return context


def tls_client_context() -> ssl.SSLContext:
    """A verifying client context that trusts :func:`tls_authority` (for clients other than the daemon)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    tls_authority().configure_trust(context)
    return context


def assert_transport_used(fault: FaultProxy) -> None:
    """The daemon spoke what the fault proxy serves, with no silent fallback: over TLS every connection that
    carried a request completed a handshake, and no connection failed one or spoke plain HTTP; over plain HTTP
    no handshake happened, and the daemon's TLS attempt was refused first (it tries https before http with
    ``--tls-verify=false``: the fallback)."""
    served = [c for c in fault.connections if c.requests]
    counters = fault.counters
    assert served, "no request reached the fault proxy"
    if fault.transport == "tls":
        assert counters.tls_handshakes >= len(served) > 0, counters
        assert all(c.tls_version is not None for c in served), [(c.number, c.tls_version) for c in served]
        assert counters.tls_failures == 0 and counters.protocol_errors == 0, counters
    else:
        assert counters.tls_handshakes == 0 and all(c.tls_version is None for c in served), counters
        assert counters.protocol_errors >= 1, f"no TLS attempt refused before plain HTTP: {counters}"


__all__ = ["TRANSPORTS", "assert_transport_used", "tls_authority", "tls_client_context", "tls_server_context"]
