"""Helpers every layer uses: worker-thread shares, JSON nesting limits."""
