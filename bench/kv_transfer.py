"""KV hand-over throughput: each KV transport backend against a raw TCP
socket and an in-process memcpy of the same bytes (the baselines), on
loopback, same run.

    python -m bench.kv_transfer [--sizes-mib 1 8 64] [--repeats 3]

The receiving side runs in its own process, as a decode worker would: a real
KVTransfer server over a staging store, and a plain TCP sink. Payloads are
shaped like SmolLM2-135M's KV on the CPU backend (30 layers, 96 KiB blocks of
128 tokens), so 3 MiB ≈ one 128-token block across all layers; the bytes
are a real bf16 tensor of that layout. Writes bench/results/kv_transfer.json
(per backend and size: `gb_s`, `ratio_vs_tcp`, `ratio_vs_memcpy`) and .png.
Backends: `nixl` (the decode engine reads the blocks out of the prefill
engine's registered cache into its own, checksums verified: the whole
hand-over once the offer is known), `collective` (a producer process sends
each layer over its Gloo pair as a forward would; timed until the blocks
are verified and in the consumer's cache), `grpc` (push into the decode worker's
staging store) and `grpc-fetch` (the engine's second hop out of it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import socket
import statistics
import time
import uuid
from pathlib import Path

import torch

LAYERS = 30
BLOCK_SHAPE = (3, 128, 128)  # kv heads, block size, 2 x head dim
BLOCK_BYTES = 3 * 128 * 128 * 2  # bf16
RESULTS = Path(__file__).resolve().parent / "results"


def _serve(grpc_port: int, tcp_port: int, ready) -> None:
    from baton.rpc import ServiceBinding, start_server
    from baton.v1 import kv_transfer_pb2_grpc
    from kv_transfer.service import SERVICE_NAME, KVTransferServicer
    from kv_transfer.staging import StagingStore

    async def main():
        store = StagingStore(capacity_bytes=4 << 30, ttl_s=600)
        servicer = KVTransferServicer(store, chunk_bytes=1 << 20)
        server, _, _ = await start_server("bench", [ServiceBinding(
            SERVICE_NAME, kv_transfer_pb2_grpc.add_KVTransferServicer_to_server, servicer)], "127.0.0.1", grpc_port)

        async def sink(reader, writer):
            while True:
                head = await reader.read(8)
                if not head:
                    break
                remaining = int.from_bytes(head, "big")
                while remaining:
                    remaining -= len(await reader.read(min(remaining, 4 << 20)))
                writer.write(b"k")
                await writer.drain()

        await asyncio.start_server(sink, "127.0.0.1", tcp_port)
        ready.set()
        await server.wait_for_termination()

    asyncio.run(main())


def _kv_cache(num_blocks: int, seed: int):
    from kv_transfer.transport.base import KVCache

    generator = torch.Generator().manual_seed(seed)
    layers = {f"layer.{i:02d}": torch.randn((num_blocks, *BLOCK_SHAPE), generator=generator).to(torch.bfloat16)
              for i in range(LAYERS)}
    return KVCache(layers, num_blocks, "bench", 128)


def _nixl_producer(conn, num_blocks: int) -> None:
    """A prefill engine's side: a registered cache; offers its blocks on request."""
    from kv_transfer.connector.metadata import SaveSpec
    from kv_transfer.transport.nixl import NixlBackend

    producer = NixlBackend("bench-producer", offer_ttl_s=600)
    producer.attach(_kv_cache(num_blocks, 1))
    conn.send(producer.endpoint())
    while (message := conn.recv()) is not None:
        transfer_id, blocks, consumer = message
        producer.send(SaveSpec(transfer_id, transfer_id, consumer, tuple(range(blocks)), blocks * 128, "",
                               "nixl")).step_done()
        producer._announcer.submit(lambda: None).result()
        conn.send("offered")


def _nixl_receive(consumer, conn, producer_endpoint: str, num_blocks: int) -> float:
    from kv_transfer.connector.metadata import LoadSpec

    transfer_id = uuid.uuid4().hex
    conn.send((transfer_id, num_blocks, consumer.endpoint()))
    assert conn.recv() == "offered"
    started = time.perf_counter()
    received = consumer.receive(LoadSpec(transfer_id, transfer_id, tuple(range(num_blocks)), 0, num_blocks * 128,
                                         -1, "nixl", producer_endpoint))
    seconds = time.perf_counter() - started
    assert received.bytes == num_blocks * LAYERS * BLOCK_BYTES
    return seconds


def _collective_producer(conn, num_blocks: int) -> None:
    """A prefill engine's side: pushes its blocks layer by layer on request."""
    from kv_transfer.connector.metadata import SaveSpec
    from kv_transfer.transport.collective import CollectiveBackend

    producer = CollectiveBackend("bench-producer", "127.0.0.1", consumer=False)
    cache = _kv_cache(num_blocks, 3)
    producer.attach(cache)
    conn.send("ready")
    while (message := conn.recv()) is not None:
        transfer_id, blocks, consumer = message
        outbound = producer.send(SaveSpec(transfer_id, transfer_id, consumer, tuple(range(blocks)), blocks * 128,
                                          "", "collective"))
        for index, layer in enumerate(cache.layers):  # as a forward would, layer by layer
            outbound.layer_saved(index, layer)
        outbound.step_done()


def _collective_receive(consumer, conn, num_blocks: int) -> float:
    """From the producer's first layer to the blocks in the consumer's cache."""
    from kv_transfer.connector.metadata import LoadSpec

    transfer_id = uuid.uuid4().hex
    started = time.perf_counter()
    conn.send((transfer_id, num_blocks, consumer.endpoint()))
    received = consumer.receive(LoadSpec(transfer_id, transfer_id, tuple(range(num_blocks)), 0, num_blocks * 128,
                                         -1, "collective"))
    seconds = time.perf_counter() - started
    assert received.bytes == num_blocks * LAYERS * BLOCK_BYTES
    return seconds


def _push_and_fetch(sender, receiver, target: str, payload: memoryview, num_blocks: int) -> tuple[float, float]:
    from kv_transfer.wire import KVLayout

    layout = KVLayout("bench", tuple(f"layer.{i}" for i in range(LAYERS)), "bfloat16", 128, BLOCK_SHAPE)
    transfer_id = uuid.uuid4().hex
    layer_bytes = num_blocks * BLOCK_BYTES
    header = layout.header(transfer_id, num_blocks * 128, num_blocks)
    started = time.perf_counter()
    sender.push(target, header,
                ((i, payload[i * layer_bytes:(i + 1) * layer_bytes]) for i in range(LAYERS)), [])
    pushed = time.perf_counter()
    _, chunks = receiver.fetch(transfer_id, 10_000)
    got = sum(len(c.data) for c in chunks)
    fetched = time.perf_counter()
    assert got == len(payload), (got, len(payload))
    return pushed - started, fetched - pushed


def _raw_tcp(sock: socket.socket, payload: memoryview) -> float:
    started = time.perf_counter()
    sock.sendall(len(payload).to_bytes(8, "big"))
    sock.sendall(payload)
    assert sock.recv(1) == b"k"
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes-mib", type=float, nargs="+", default=[1, 8, 64])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from baton.rpc import free_port
    from kv_transfer.transport.grpc_stream import GrpcStreamReceiver, GrpcStreamSender

    grpc_port, tcp_port = free_port(), free_port()
    ready = mp.get_context("spawn").Event()
    server = mp.get_context("spawn").Process(target=_serve, args=(grpc_port, tcp_port, ready), daemon=True)
    server.start()
    assert ready.wait(30), "bench server did not start"
    sender = GrpcStreamSender(chunk_bytes=1 << 20)
    target = f"127.0.0.1:{grpc_port}"
    receiver = GrpcStreamReceiver(f"127.0.0.1:{grpc_port}")
    sock = socket.create_connection(("127.0.0.1", tcp_port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    from kv_transfer.transport.nixl import NixlBackend

    max_blocks = max(1, round(max(args.sizes_mib) * (1 << 20) / (LAYERS * BLOCK_BYTES)))
    conn, child_conn = mp.get_context("spawn").Pipe()
    producer = mp.get_context("spawn").Process(target=_nixl_producer, args=(child_conn, max_blocks), daemon=True)
    producer.start()
    producer_endpoint = conn.recv()
    consumer = NixlBackend("bench-consumer")
    consumer.attach(_kv_cache(max_blocks, 2))

    from kv_transfer.transport.collective import CollectiveBackend

    collective_conn, child_conn = mp.get_context("spawn").Pipe()
    collective_producer = mp.get_context("spawn").Process(target=_collective_producer,
                                                          args=(child_conn, max_blocks), daemon=True)
    collective_producer.start()
    assert collective_conn.recv() == "ready"
    collective = CollectiveBackend("bench-consumer", "127.0.0.1", consumer=True, capacity_bytes=4 << 30)
    collective.attach(_kv_cache(max_blocks, 4))

    rows, results = [], []
    for size_mib in args.sizes_mib:
        num_blocks = max(1, round(size_mib * (1 << 20) / (LAYERS * BLOCK_BYTES)))
        kv = torch.randn(LAYERS * num_blocks, *BLOCK_SHAPE, dtype=torch.bfloat16)
        payload = memoryview(kv.view(torch.uint8).numpy()).cast("B")
        _push_and_fetch(sender, receiver, target, payload, num_blocks)  # warm-up
        _raw_tcp(sock, payload)
        _nixl_receive(consumer, conn, producer_endpoint, num_blocks)
        _collective_receive(collective, collective_conn, num_blocks)
        push, fetch, nixl, gloo, tcp, copy = [], [], [], [], [], []
        for _ in range(args.repeats):
            p, f = _push_and_fetch(sender, receiver, target, payload, num_blocks)
            push.append(p)
            fetch.append(f)
            nixl.append(_nixl_receive(consumer, conn, producer_endpoint, num_blocks))
            gloo.append(_collective_receive(collective, collective_conn, num_blocks))
            tcp.append(_raw_tcp(sock, payload))
            started = time.perf_counter()
            bytearray(payload)
            copy.append(time.perf_counter() - started)
        def gbps(seconds: list[float], nbytes: int = len(payload)) -> float:
            return nbytes / statistics.median(seconds) / 1e9

        row = {"bytes": len(payload), "tokens": num_blocks * 128,
               "nixl_gbps": gbps(nixl), "collective_gbps": gbps(gloo), "grpc_push_gbps": gbps(push), "grpc_fetch_gbps": gbps(fetch),
               "raw_tcp_gbps": gbps(tcp), "memcpy_gbps": gbps(copy)}
        row["push_vs_raw_tcp"] = row["grpc_push_gbps"] / row["raw_tcp_gbps"]
        rows.append(row)
        for backend, key in (("nixl", "nixl_gbps"), ("collective", "collective_gbps"), ("grpc", "grpc_push_gbps"), ("grpc-fetch", "grpc_fetch_gbps")):
            results.append({"backend": backend, "size_mib": round(len(payload) / 2**20, 2), "gb_s": row[key],
                             "ratio_vs_tcp": row[key] / row["raw_tcp_gbps"],
                             "ratio_vs_memcpy": row[key] / row["memcpy_gbps"]})
        print(f"{len(payload) / 2**20:7.1f} MiB ({row['tokens']:5d} tokens): NIXL {row['nixl_gbps']:.2f} GB/s, collective {row['collective_gbps']:.2f} GB/s, gRPC push {row['grpc_push_gbps']:.2f} GB/s, "
              f"fetch {row['grpc_fetch_gbps']:.2f} GB/s, raw TCP {row['raw_tcp_gbps']:.2f} GB/s "
              f"(push = {row['push_vs_raw_tcp']:.2f}x raw TCP), memcpy {row['memcpy_gbps']:.1f} GB/s", flush=True)
    server.terminate()
    conn.send(None)
    collective_conn.send(None)
    producer.join(10)
    collective_producer.join(10)
    consumer.close()
    collective.close()

    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "kv_transfer",
              "baseline": "raw TCP socket and in-process memcpy, same bytes, same run",
              "command": "make bench-kv", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "results": results, "rows": rows}
    (RESULTS / "kv_transfer.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot(rows, RESULTS / "kv_transfer.png")
    print(f"wrote {RESULTS / 'kv_transfer.json'} and kv_transfer.png")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["bytes"] / 2**20 for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("nixl_gbps", "Baton NIXL (read + verify)"),
                       ("collective_gbps", "Baton collective (Gloo, layer by layer + verify)"), ("grpc_push_gbps", "Baton gRPC push"), ("grpc_fetch_gbps", "Baton gRPC fetch"),
                       ("raw_tcp_gbps", "raw TCP (baseline)"), ("memcpy_gbps", "memcpy (baseline)")):
        ax.plot(sizes, [r[key] for r in rows], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("KV payload (MiB)")
    ax.set_ylabel("throughput (GB/s)")
    ax.set_title("KV hand-over on loopback")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
