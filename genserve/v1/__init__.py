"""genserve.v1: generated from proto/genserve/v1/*.proto by scripts/gen_proto.py; do not edit the *_pb2 modules."""
