"""Router: the public API (OpenAI-compatible HTTP and gRPC ``Inference``),
tokenization, and the schedule → prefill → decode pipeline."""
