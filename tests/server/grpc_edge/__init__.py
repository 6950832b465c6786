"""Tests of server/grpc_edge/: the service over a real channel, the accept path, wake-ups, security."""
