"""genserve server: the gRPC front, the GenStage-style pipeline and its supervisor (python -m server)."""
