"""Runnable examples: `python -m examples.<name>` from the project root (they import each other as a package)."""
