"""image-proxy: the daemon side (session, handler, transports, blob streaming)."""
