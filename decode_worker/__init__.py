"""Decode worker: a vLLM engine in KV-consumer role behind ``DecodeWorker``;
the engine itself hosts the KV endpoints prefill workers send to."""
