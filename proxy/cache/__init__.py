"""The verified, crash-safe blob cache on disk."""
