"""The server: sessions (one per client connection), the protocol methods, pipes and their producers, the daemon,
limits, peer credentials, systemd, logs."""
