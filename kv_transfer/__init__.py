"""KV-cache hand-over from prefill to decode workers.

- ``connector/``: the vLLM v1 KV connector (scheduler side, worker side),
  loaded out of tree by ``kv_connector_module_path="kv_transfer.connector"``.
- ``service.py`` + ``staging.py``: the ``KVTransfer`` gRPC endpoint a decode
  worker hosts, and its bounded, expiring staging store.
- ``transport/``: how bytes move: NIXL reads between the engines' caches,
  or gRPC chunk streaming through the staging store.
- ``params.py``: the one place ``kv_transfer_params`` are built and parsed.
"""
