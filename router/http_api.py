"""OpenAI-compatible HTTP API (FastAPI): /v1/completions,
/v1/chat/completions, /v1/models, /health, /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from baton.errors import BatonError, ClientError, openai_error_body
from baton.logs import bind_request, get_logger
from router import requests as gen_requests
from router.frontend import Frontend
from router.openai_schema import ChatCompletionRequest, CompletionRequest

log = get_logger(__name__)


def _error_response(exc: BatonError) -> JSONResponse:
    return JSONResponse(openai_error_body(exc), status_code=exc.http_status)


def _validation_message(exc: ValidationError | RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    return (f"{param}: {first.get('msg')}" if param else str(first.get("msg"))), param


def create_app(frontend: Frontend) -> FastAPI:
    app = FastAPI(title="Baton", docs_url=None, redoc_url=None)

    @app.exception_handler(BatonError)
    async def _baton_error(_request: Request, exc: BatonError):
        if exc.http_status >= 500:
            log.warning("request failed", status=exc.http_status, error=exc.message)
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return _error_response(ClientError(message, param=param))

    async def _parse(request: Request, model):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ClientError("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ClientError("the request body must be a JSON object")
        try:
            return model.model_validate(body)
        except ValidationError as exc:
            message, param = _validation_message(exc)
            raise ClientError(message, param=param) from None

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(frontend.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": frontend.limits.model_name, "object": "model",
                                            "created": frontend.started_at, "owned_by": "baton"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body: ChatCompletionRequest = await _parse(request, ChatCompletionRequest)
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        except ValueError as exc:
            raise ClientError(str(exc), param="messages") from None
        gen = await frontend.prepare_chat(body, messages)
        return await _respond(request, frontend, gen, body, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body: CompletionRequest = await _parse(request, CompletionRequest)
        try:
            prompt = body.single_prompt()
        except ValueError as exc:
            raise ClientError(str(exc), param="prompt") from None
        gen = await frontend.prepare_completion(body, prompt)
        return await _respond(request, frontend, gen, body, chat=False)

    return app


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _respond(request: Request, frontend: Frontend, gen: gen_requests.GenerationRequest, body, *,
                   chat: bool):
    bind_request(gen.request_id)
    if body.stream:  # Starlette cancels the stream when the client goes away
        return StreamingResponse(_stream(frontend, gen, body, chat, int(time.time())),
                                 media_type="text/event-stream")
    # A plain response is not cancelled on disconnect: race it against the
    # client, so nobody's abandoned request keeps the workers busy.
    answer = asyncio.create_task(_complete(frontend, gen, body, chat))
    gone = asyncio.create_task(_until_disconnected(request))
    await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    if not answer.done():
        answer.cancel()
        log.info("client disconnected; request cancelled")
        with contextlib.suppress(asyncio.CancelledError):
            await answer
        return Response(status_code=499)
    gone.cancel()
    return answer.result()


async def _complete(frontend: Frontend, gen: gen_requests.GenerationRequest, body, chat: bool) -> JSONResponse:
    created = int(time.time())
    kind = "chat.completion" if chat else "text_completion"
    api = "chat" if chat else "completions"
    text, n_tokens, reason, kv = [], 0, None, None
    async with contextlib.aclosing(frontend.run(gen, api)) as deltas:
        async for delta in deltas:
            text.append(delta.text)
            n_tokens += len(delta.token_ids)
            reason = delta.finish_reason or reason
            kv = delta.kv or kv
    usage = {"prompt_tokens": len(gen.prompt_token_ids), "completion_tokens": n_tokens,
             "total_tokens": len(gen.prompt_token_ids) + n_tokens}
    content = "".join(text)
    choice = ({"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": reason}
              if chat else {"index": 0, "text": content, "finish_reason": reason, "logprobs": None})
    response = {"id": gen.request_id, "object": kind, "created": created, "model": body.model,
                "choices": [choice], "usage": usage}
    if kv is not None:
        response["kv_transfer"] = _kv_json(kv)
    return JSONResponse(response)


def _kv_json(kv) -> dict:
    return {"transfer_id": kv.transfer_id, "external_tokens": kv.external_tokens, "bytes": kv.bytes,
            "recomputed": kv.recomputed}


async def _stream(frontend: Frontend, gen, body, chat: bool, created: int) -> AsyncIterator[str]:
    kind = "chat.completion.chunk" if chat else "text_completion"
    api = "chat" if chat else "completions"
    base = {"id": gen.request_id, "object": kind, "created": created, "model": body.model}

    def event(payload: dict) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    if chat:
        yield event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "finish_reason": None}]})
    n_tokens = 0
    try:
        async with contextlib.aclosing(frontend.run(gen, api)) as deltas:
            async for delta in deltas:
                n_tokens += len(delta.token_ids)
                choice = ({"index": 0, "delta": {"content": delta.text}, "finish_reason": delta.finish_reason}
                          if chat else {"index": 0, "text": delta.text, "finish_reason": delta.finish_reason,
                                        "logprobs": None})
                chunk = {**base, "choices": [choice]}
                if delta.kv is not None:
                    chunk["kv_transfer"] = _kv_json(delta.kv)
                yield event(chunk)
    except BatonError as exc:
        # Headers are already sent: OpenAI streams report errors as an event.
        log.warning("stream failed", error=exc.message)
        yield event(openai_error_body(exc))
        yield "data: [DONE]\n\n"
        return
    if body.stream_options and body.stream_options.include_usage:
        yield event({**base, "choices": [], "usage": {
            "prompt_tokens": len(gen.prompt_token_ids), "completion_tokens": n_tokens,
            "total_tokens": len(gen.prompt_token_ids) + n_tokens}})
    yield "data: [DONE]\n\n"
