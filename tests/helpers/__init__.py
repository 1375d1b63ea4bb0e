"""Shared test helpers (multi-process launching, small models)."""
