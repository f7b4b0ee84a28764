"""Prefill worker: a vLLM engine in KV-producer role behind ``PrefillWorker``."""
