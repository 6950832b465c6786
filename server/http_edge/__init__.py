"""The HTTP edge: OpenAI-compatible endpoints over the pipeline core (``app``), and the
conversions between OpenAI's JSON and our requests and results (``openai_api``)."""
