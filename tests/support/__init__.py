"""Test support: an independent wire-level protocol driver and deterministic image builders."""
