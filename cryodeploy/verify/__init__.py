"""Proof that backends compute the same thing and how fast: parity, benchmarks, reference bundles."""
