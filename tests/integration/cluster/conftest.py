"""The ``cluster_factory`` fixture lives in tests/conftest.py: upgrade tests use it too."""
