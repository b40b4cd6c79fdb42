"""Benchmarks: commands that print tables and write JSON (and PNG plots where useful)."""
