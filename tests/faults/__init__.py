"""Fault injection between the daemon and a real registry: the harness (proxy.py) and the matrix."""
