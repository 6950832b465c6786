"""The test suite: a package, as is each folder in it, so that every module has one name
(``tests.server.pipeline.stage_kit``) for pytest and mypy."""
