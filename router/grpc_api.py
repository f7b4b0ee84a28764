"""The public gRPC ``Inference`` service."""

from __future__ import annotations

import contextlib

import grpc

from baton.errors import BatonError, ClientError
from baton.logs import bind_request
from baton.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from router import requests as gen_requests
from router.frontend import Frontend

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
_FINISH = {"stop": common_pb2.FINISH_REASON_STOP, "length": common_pb2.FINISH_REASON_LENGTH,
           "abort": common_pb2.FINISH_REASON_ABORT}


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, frontend: Frontend):
        self._frontend = frontend

    async def _prepare(self, request: inference_pb2.GenerateRequest) -> gen_requests.GenerationRequest:
        frontend = self._frontend
        gen_requests.check_model(frontend.limits, request.model)
        which = request.WhichOneof("input")
        if which == "prompt":
            token_ids = await frontend.tokenizer.text(request.prompt)
        elif which == "chat":
            if not request.chat.messages:
                raise ClientError("chat.messages is empty", param="chat")
            token_ids = await frontend.tokenizer.chat(
                [{"role": m.role, "content": m.content} for m in request.chat.messages])
        elif which == "token_ids":
            token_ids = list(request.token_ids.ids)
        else:
            raise ClientError("give one of prompt, chat or token_ids", param="input")
        s = request.sampling
        return gen_requests.build(
            frontend.limits, request.request_id or gen_requests.new_request_id("grpc"), token_ids,
            max_tokens=s.max_tokens or None,
            temperature=s.temperature if s.HasField("temperature") else None,
            top_p=s.top_p if s.HasField("top_p") else None,
            seed=s.seed if s.HasField("seed") else None, stop=list(s.stop), ignore_eos=s.ignore_eos)

    async def Generate(self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        try:
            gen = await self._prepare(request)
            bind_request(gen.request_id)
            produced = 0
            async with contextlib.aclosing(self._frontend.run(gen, "grpc")) as deltas:
                async for delta in deltas:
                    produced += len(delta.token_ids)
                    message = inference_pb2.GenerateResponse(
                        request_id=gen.request_id, text=delta.text, token_ids=delta.token_ids,
                        finish_reason=_FINISH.get(delta.finish_reason or "", common_pb2.FINISH_REASON_UNSPECIFIED),
                        prompt_tokens=len(gen.prompt_token_ids), completion_tokens=produced)
                    if delta.kv is not None:
                        message.kv.CopyFrom(delta.kv)
                    yield message
        except BatonError as exc:
            await context.abort(exc.grpc_code, exc.message)

    async def ListModels(self, request, context):
        return inference_pb2.ListModelsResponse(models=[self._frontend.limits.model_name])
