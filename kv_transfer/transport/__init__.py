"""How KV bytes move between engines. ``base`` holds the contract; each
backend lives in its own module. Today: ``grpc_stream`` (CPU and GPU)."""
