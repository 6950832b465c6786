"""genserve wire protocol: Python modules generated from proto/genserve (see scripts/gen_proto.py)."""
