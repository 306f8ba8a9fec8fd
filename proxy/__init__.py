"""image-proxy: the daemon side (session, handler, transports, blob streaming)."""

__version__ = "0.1.0"
