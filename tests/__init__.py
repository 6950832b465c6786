"""The test suite (a package, so that tests.chaos and tests.serving have one name each for pytest and mypy)."""
