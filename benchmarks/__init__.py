"""Benchmarks: ``python -m benchmarks`` (or ``make bench``); each prints Markdown tables."""
