"""Benchmarks and studies: `python benchmarks/<name>.py`, or `python -m benchmarks.<name>` for those that use the
examples (quality, causal_quality, projection)."""
