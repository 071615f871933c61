"""The package version (one place; pyproject.toml holds the same string, checked by tests/test_packaging.py)."""

__version__ = "0.1.0"
