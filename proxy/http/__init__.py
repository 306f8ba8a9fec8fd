"""HTTP/1.1 client for the registry transport, on trio + h11.

- :mod:`.connection`: one connection (a trio stream and an ``h11.Connection``), per-phase deadlines.
- :mod:`.pool`: connections per (scheme, host, port), a per-host limit, proxies from the environment.
- :mod:`.redirects`: following redirects without leaking ``Authorization``.
- :mod:`.tls`: ``ssl.SSLContext`` from certs.d-style directories.
- :mod:`.errors`: what went wrong, where, and whether trying again may help.
"""
