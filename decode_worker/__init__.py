"""Decode worker: a vLLM engine in KV-consumer role behind ``DecodeWorker``,
hosting the ``KVTransfer`` endpoint prefill workers push to."""
