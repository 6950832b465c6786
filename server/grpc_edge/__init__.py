"""The gRPC edge: the genserve.v1.Generator servicer (``service``) over the pipeline core, its wire
format (``wire``, ``outbox``), the accept path and grpc core patches (``accept``, ``wakeups``),
bearer-token auth and TLS (``auth``) and server reflection (``reflection``)."""
