"""The OpenAI-compatible HTTP API: vLLM's own OpenAI server, mounted over
the Baton engine client. Its routes, request validation, response bodies,
streaming chunks and error bodies are those of `vllm serve` (chat and text
completions, /v1/models, /tokenize, /detokenize, /version, /health,
/metrics)."""

from __future__ import annotations

from argparse import Namespace

from fastapi import FastAPI

from router.engine_client import BatonEngineClient

_TASKS = ("generate",)


async def create_app(engine: BatonEngineClient, args: Namespace) -> FastAPI:
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.app import build_app

    app = build_app(args, _TASKS, engine.model_config)
    await init_app_state(engine, app.state, args, _TASKS)
    return app
