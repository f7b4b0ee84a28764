"""W3C trace context crosses gRPC hops for unary and streaming calls."""

from baton.rpc import ServiceBinding, channel, start_server
from baton.telemetry import current_trace_id, setup_tracing, traced_stream, tracer
from baton.v1 import (
    common_pb2,
    control_plane_pb2,
    control_plane_pb2_grpc,
    decode_pb2,
    decode_pb2_grpc,
)


class _Echo(decode_pb2_grpc.DecodeWorkerServicer, control_plane_pb2_grpc.ControlPlaneServicer):
    """Answers each call with the trace id it saw."""

    async def Decode(self, request, context):
        yield decode_pb2.DecodeResponse(kv=common_pb2.KVLoadStats(transfer_id=current_trace_id()))

    async def ReportTransfer(self, request, context):
        return control_plane_pb2.TransferReportAck(state=current_trace_id())


async def test_one_trace_across_unary_and_streaming_calls():
    setup_tracing("test")
    echo = _Echo()
    server, port, _ = await start_server("test", [
        ServiceBinding("baton.v1.DecodeWorker", decode_pb2_grpc.add_DecodeWorkerServicer_to_server, echo),
        ServiceBinding("baton.v1.ControlPlane", control_plane_pb2_grpc.add_ControlPlaneServicer_to_server, echo),
    ], "127.0.0.1", 0)
    try:
        async with channel(f"127.0.0.1:{port}") as ch:
            seen = []

            async def calls():
                seen.append(current_trace_id())
                reply = await control_plane_pb2_grpc.ControlPlaneStub(ch).ReportTransfer(
                    control_plane_pb2.TransferReport())
                seen.append(reply.state)
                async for message in decode_pb2_grpc.DecodeWorkerStub(ch).Decode(decode_pb2.DecodeRequest()):
                    seen.append(message.kv.transfer_id)
                    yield message

            async for _ in traced_stream(calls(), tracer("test").start_span("root")):
                pass
        assert len(seen) == 3 and seen[0] and len(set(seen)) == 1, seen
    finally:
        await server.stop(0)
