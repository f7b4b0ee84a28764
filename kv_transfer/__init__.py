"""KV-cache hand-over from prefill to decode engines.

- ``connector/``: the vLLM v1 KV connector (scheduler side, worker side),
  loaded out of tree by ``kv_connector_module_path="kv_transfer.connector"``.
- ``transport/``: how bytes move (NIXL reads between the engines' caches,
  a collective send/recv, or gRPC streaming), behind one interface.
- ``wire.py``: the cache layout both engines must share.
- ``params.py``: the one place ``kv_transfer_params`` are built and parsed.
"""
