"""Backends: ``reference`` (dense numpy/torch blocks, the oracle) and ``cpu`` (compiled C)."""
