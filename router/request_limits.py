"""Limits that protect the engines from one request: a body size (HTTP 413),
a cap on the tokens a request may ask to generate (HTTP 400 naming the
cap; requests that ask for none get at most the cap, through vLLM's own
``max_new_tokens`` override), and a write timeout: a client that stops
reading its stream is dropped once a write has waited that long, which
aborts its request and frees its KV on the engines, instead of holding a
decode slot for minutes.

The total deadline of a request is the router's ``request_timeout_s``
(router/pipeline.py)."""

from __future__ import annotations

import asyncio
import gc
import json
import time

from baton.logs import get_logger
from router.http_errors import send_error

log = get_logger(__name__)

# Where each OpenAI API names the tokens to generate.
MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


# How long a stalled write waits for the app to cancel it (as it does on a
# disconnect) before it raises instead.
_CANCEL_WAIT_S = 5.0


class _BodyTooLarge(Exception):
    pass


class _ClientStalled(Exception):
    pass


def too_many_tokens(body: dict, cap: int) -> str:
    """Why a request body asks more tokens than ``cap`` ("" if it does not)."""
    for field in MAX_TOKENS_FIELDS:
        value = body.get(field)
        if isinstance(value, bool) or value is None:
            continue
        try:
            asked = float(value)  # vLLM's models take "100000" and 1e5 too
        except (TypeError, ValueError):
            continue  # not a number: vLLM refuses it with its own 400
        if asked > cap:
            return f"{field} is {value}, above this server's limit of {cap} tokens per request."
    return ""


class RequestLimits:
    """ASGI, inside the key check: body size and token cap before anything
    runs, the write timeout while the answer streams."""

    def __init__(self, app, max_body_bytes: int, max_tokens_cap: int, write_timeout_s: float):
        self._app = app
        self._max_body = max_body_bytes
        self._cap = max_tokens_cap
        self._write_timeout_s = write_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self._app(scope, receive, send)
        declared = next((v for k, v in scope.get("headers", ()) if k.lower() == b"content-length"), None)
        if self._max_body and declared is not None and declared.isdigit() and int(declared) > self._max_body:
            return await self._refuse_size(send)
        try:
            body = await self._read_body(receive)
        except _BodyTooLarge:
            return await self._refuse_size(send)
        if self._cap and scope["method"] == "POST":  # every route that may generate (batch, invocations...)
            try:
                parsed = json.loads(body) if body else {}
            except ValueError:
                parsed = {}  # vLLM answers malformed JSON with its own 400
            reason = too_many_tokens(parsed, self._cap) if isinstance(parsed, dict) else ""
            if reason:
                return await send_error(send, 400, reason, "BadRequestError", 400)
        gone = asyncio.Event()  # set when the client stopped reading: it counts as gone
        try:
            await self._app(scope, self._replay(body, receive, gone), self._timed(send, scope, gone))
        except Exception:
            if not gone.is_set():
                raise
            # A response that does not listen for disconnects, ended by its
            # stalled write instead: end it quietly (the connection closes).
        if gone.is_set():
            # The stream's generator, left suspended by the cancelled write,
            # is closed (and vLLM aborts the request, freeing its KV) only
            # when it is collected, and the cancellation left it in a
            # reference cycle: collect now rather than whenever the
            # collector next runs.
            started = time.monotonic()
            gc.collect()
            log.info("stalled request collected", gc_ms=round((time.monotonic() - started) * 1000, 1))

    async def _read_body(self, receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if self._max_body and size > self._max_body:
                raise _BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    @staticmethod
    def _replay(body: bytes, receive, gone: asyncio.Event):
        sent = False

        async def replayed():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            # After the body: the client's disconnect, or its stalled reading,
            # which the app handles as one (Starlette stops the stream and
            # vLLM aborts the request, freeing its KV).
            if not gone.is_set():
                receiving = asyncio.ensure_future(receive())
                stalled = asyncio.ensure_future(gone.wait())
                try:
                    await asyncio.wait({receiving, stalled}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stalled.cancel()
                    if not receiving.done():
                        receiving.cancel()
                if receiving.done() and not receiving.cancelled():
                    return receiving.result()
            return {"type": "http.disconnect"}

        return replayed

    def _timed(self, send, scope, gone: asyncio.Event):
        if not self._write_timeout_s:
            return send

        async def timed(message):
            if gone.is_set():
                raise _ClientStalled
            try:
                await asyncio.wait_for(send(message), self._write_timeout_s)
            except TimeoutError:
                log.warning("client stopped reading; request dropped", path=scope["path"],
                            write_timeout_s=self._write_timeout_s)
                gone.set()
                # The app's disconnect listener cancels this write; a
                # response without one gets the error instead.
                await asyncio.sleep(_CANCEL_WAIT_S)
                raise _ClientStalled from None

        return timed

    async def _refuse_size(self, send) -> None:
        await send_error(send, 413, f"The request body is larger than this server's limit of {self._max_body} bytes.",
                         "BadRequestError", 413)
