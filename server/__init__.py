"""genserve server (python -m server): the pipeline core, its ingresses (gRPC, AMQP) and the process runtime (docs/architecture.md)."""
