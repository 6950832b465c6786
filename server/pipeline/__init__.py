"""The pipeline core: requests become jobs (``requests``), admission lets them in (``admission``,
``core``), stages carry them through bounded links (``links``, ``stages/``) to the engine, and every
job ends with exactly one outcome (``jobs``, ``statuses``), under a supervisor that restarts failed
stages (``supervisor``). It imports no transport: the ingresses (gRPC, AMQP) use it, never the
other way round (docs/architecture.md)."""
