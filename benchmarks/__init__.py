"""Benchmarks, installed as ``fastppo.benchmarks``: run ``fastppo bench`` or, from a checkout,
``python -m benchmarks.<script>``. Modules import each other relatively so both names work."""
