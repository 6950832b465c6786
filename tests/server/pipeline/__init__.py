"""Tests of server/pipeline/, the core: links, stages, admission, supervision, the pipeline."""
