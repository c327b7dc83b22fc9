"""Losses as pure functions, one module per method; each docstring gives formula and equation."""
