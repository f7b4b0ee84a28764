"""The proxy in front of vLLM's own prefill/decode pair (NixlConnector), in
the protocol of vLLM's toy proxy: each completion is first prefilled by the
prefill engine (one token, `do_remote_decode`), then sent with the
`kv_transfer_params` that came back to the decode engine, which pulls the KV
blocks over NIXL and generates; its answer is streamed back unchanged.
Every other path (/health, /v1/models, /tokenize, /metrics...) goes to the
decode engine.

    python -m bench.vllm_pd_proxy --port 8000 --prefill http://127.0.0.1:8100 --decode http://127.0.0.1:8200
"""

from __future__ import annotations

import argparse
import contextlib

import httpx
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

# What the prefill engine needs to keep the request's KV blocks for a remote
# decode instead of freeing them; it answers with where to fetch them from.
PREFILL_KV_PARAMS = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


def prefill_body(body: dict) -> dict:
    """The request as the prefill engine gets it: one token, no streaming."""
    prefill = {**body, "max_tokens": 1, "stream": False, "kv_transfer_params": PREFILL_KV_PARAMS}
    if "max_completion_tokens" in prefill:
        prefill["max_completion_tokens"] = 1
    prefill.pop("stream_options", None)
    return prefill


def create_app(prefill_url: str, decode_url: str) -> FastAPI:
    client: httpx.AsyncClient | None = None

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        nonlocal client
        # No pool limit: every request of the load is in flight at once.
        async with httpx.AsyncClient(
            timeout=None, limits=httpx.Limits(max_connections=None)
        ) as client:
            yield

    app = FastAPI(lifespan=lifespan)

    async def relay(upstream: httpx.Response) -> StreamingResponse:
        return StreamingResponse(
            upstream.aiter_raw(),
            status_code=upstream.status_code,
            media_type=upstream.headers.get("content-type"),
            background=BackgroundTask(upstream.aclose),
        )

    @app.post("/v1/chat/completions")
    @app.post("/v1/completions")
    async def disaggregated(request: Request) -> Response:
        body = await request.json()
        path = request.url.path
        prefilled = await client.post(f"{prefill_url}{path}", json=prefill_body(body))
        if prefilled.status_code != 200:
            return Response(
                prefilled.content,
                status_code=prefilled.status_code,
                media_type=prefilled.headers.get("content-type"),
            )
        kv_transfer_params = prefilled.json().get("kv_transfer_params")
        if not kv_transfer_params:
            # The decode engine would prefill again by itself: no P/D left to measure.
            return Response("prefill engine returned no kv_transfer_params", status_code=502)
        decode = {**body, "kv_transfer_params": kv_transfer_params}
        upstream = await client.send(
            client.build_request("POST", f"{decode_url}{path}", json=decode), stream=True
        )
        return await relay(upstream)

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def to_decode(path: str, request: Request) -> Response:
        upstream = await client.send(
            client.build_request(
                request.method,
                f"{decode_url}/{path}",
                params=request.query_params,
                content=await request.body(),
                headers={"content-type": request.headers.get("content-type", "application/json")},
            ),
            stream=True,
        )
        return await relay(upstream)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--prefill", required=True, help="base URL of the prefill engine")
    parser.add_argument("--decode", required=True, help="base URL of the decode engine")
    args = parser.parse_args()
    uvicorn.run(
        create_app(args.prefill, args.decode), host=args.host, port=args.port, log_level="warning"
    )


if __name__ == "__main__":
    main()
