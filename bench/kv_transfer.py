"""KV hand-over throughput: each KV transport backend against a raw TCP
socket and an in-process memcpy of the same bytes (the baselines), on
loopback, same run.

    python -m bench.kv_transfer [--sizes-mib 1 8 64] [--repeats 3]

Producers run in their own processes, as prefill engines would; the
consumers (this process) are the backends a decode engine runs, and the
TCP baseline's sink is a process of its own. Payloads are
shaped like SmolLM2-135M's KV on the CPU backend (30 layers, 96 KiB blocks of
128 tokens), so 3 MiB ≈ one 128-token block across all layers; the bytes
are a real bf16 tensor of that layout. Writes bench/results/kv_transfer.json
(per backend and size: `gb_s`, `ratio_vs_tcp`, `ratio_vs_memcpy`) and .png.
Backends: `nixl` (the decode engine reads the blocks out of the prefill
engine's registered cache into its own, checksums verified: the whole
hand-over once the offer is known), `collective` (a producer process sends
each layer over its Gloo pair as a forward would; timed until the blocks
are verified and in the consumer's cache), `grpc` (a producer process
streams each layer to the consumer's gRPC server; timed the same way).
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


def _tcp_sink(tcp_port: int, ready) -> None:
    async def main():
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

        server = await asyncio.start_server(sink, "127.0.0.1", tcp_port)
        ready.set()
        await server.serve_forever()

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


def _push_producer(kind: str, conn, num_blocks: int) -> None:
    """A prefill engine's side of a push backend: sends its blocks layer by
    layer, as a forward would, on request."""
    from kv_transfer.connector.metadata import SaveSpec

    if kind == "collective":
        from kv_transfer.transport.collective import CollectiveBackend

        producer = CollectiveBackend("bench-producer", "127.0.0.1", consumer=False)
    else:
        from kv_transfer.transport.grpc_stream import GrpcBackend

        producer = GrpcBackend()
    cache = _kv_cache(num_blocks, 3)
    producer.attach(cache)
    conn.send("ready")
    while (message := conn.recv()) is not None:
        transfer_id, blocks, consumer = message
        outbound = producer.send(SaveSpec(transfer_id, transfer_id, consumer, tuple(range(blocks)), blocks * 128,
                                          "", kind))
        for index, layer in enumerate(cache.layers):
            outbound.layer_saved(index, layer)
        outbound.step_done()


def _push_receive(consumer, conn, num_blocks: int) -> float:
    """From the producer's first layer to the blocks verified and in the
    consumer's cache."""
    from kv_transfer.connector.metadata import LoadSpec

    transfer_id = uuid.uuid4().hex
    started = time.perf_counter()
    conn.send((transfer_id, num_blocks, consumer.endpoint()))
    received = consumer.receive(LoadSpec(transfer_id, transfer_id, tuple(range(num_blocks)), 0, num_blocks * 128,
                                         -1, consumer.name))
    seconds = time.perf_counter() - started
    assert received.bytes == num_blocks * LAYERS * BLOCK_BYTES
    return seconds


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
    from kv_transfer.transport.collective import CollectiveBackend
    from kv_transfer.transport.grpc_stream import GrpcBackend
    from kv_transfer.transport.inbox import Inbox
    from kv_transfer.transport.nixl import NixlBackend

    spawn = mp.get_context("spawn")
    tcp_port = free_port()
    ready = spawn.Event()
    sink = spawn.Process(target=_tcp_sink, args=(tcp_port, ready), daemon=True)
    sink.start()
    assert ready.wait(30), "TCP sink did not start"
    sock = socket.create_connection(("127.0.0.1", tcp_port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    max_blocks = max(1, round(max(args.sizes_mib) * (1 << 20) / (LAYERS * BLOCK_BYTES)))
    conn, child_conn = spawn.Pipe()
    producers = [spawn.Process(target=_nixl_producer, args=(child_conn, max_blocks), daemon=True)]
    producers[0].start()
    producer_endpoint = conn.recv()
    nixl = NixlBackend("bench-consumer")
    nixl.attach(_kv_cache(max_blocks, 2))
    pushers = {}  # backend → (consumer, pipe to its producer)
    for seed, (kind, consumer) in enumerate((
            ("collective", CollectiveBackend("bench-consumer", "127.0.0.1", consumer=True,
                                             inbox=Inbox(4 << 30, 600))),
            ("grpc", GrpcBackend("127.0.0.1", 0, consumer=True, inbox=Inbox(4 << 30, 600))))):
        consumer.attach(_kv_cache(max_blocks, 4 + seed))
        pipe, child = spawn.Pipe()
        producers.append(spawn.Process(target=_push_producer, args=(kind, child, max_blocks), daemon=True))
        producers[-1].start()
        assert pipe.recv() == "ready"
        pushers[kind] = (consumer, pipe)

    rows, results = [], []
    for size_mib in args.sizes_mib:
        num_blocks = max(1, round(size_mib * (1 << 20) / (LAYERS * BLOCK_BYTES)))
        kv = torch.randn(LAYERS * num_blocks, *BLOCK_SHAPE, dtype=torch.bfloat16)
        payload = memoryview(kv.view(torch.uint8).numpy()).cast("B")
        seconds = {name: [] for name in ("nixl", *pushers, "raw_tcp", "memcpy")}
        for repeat in range(args.repeats + 1):  # the first is a warm-up
            timed = {"nixl": _nixl_receive(nixl, conn, producer_endpoint, num_blocks),
                     **{kind: _push_receive(consumer, pipe, num_blocks) for kind, (consumer, pipe) in pushers.items()},
                     "raw_tcp": _raw_tcp(sock, payload)}
            started = time.perf_counter()
            bytearray(payload)
            timed["memcpy"] = time.perf_counter() - started
            if repeat:
                for name, value in timed.items():
                    seconds[name].append(value)
        row = {"bytes": len(payload), "tokens": num_blocks * 128,
               **{f"{name}_gbps": len(payload) / statistics.median(values) / 1e9 for name, values in seconds.items()}}
        rows.append(row)
        for backend in ("nixl", *pushers):
            gbps = row[f"{backend}_gbps"]
            results.append({"backend": backend, "size_mib": round(len(payload) / 2**20, 2), "gb_s": gbps,
                             "ratio_vs_tcp": gbps / row["raw_tcp_gbps"],
                             "ratio_vs_memcpy": gbps / row["memcpy_gbps"]})
        print(f"{len(payload) / 2**20:7.1f} MiB ({row['tokens']:5d} tokens): " + ", ".join(
            f"{name} {row[f'{name}_gbps']:.2f} GB/s" for name in seconds)
            + " | vs raw TCP: " + ", ".join(f"{b} {row[f'{b}_gbps'] / row['raw_tcp_gbps']:.2f}x"
                                            for b in ("nixl", *pushers)), flush=True)
    sink.terminate()
    for pipe in [conn] + [pipe for _, pipe in pushers.values()]:
        pipe.send(None)
    for process in producers:
        process.join(10)
    nixl.close()
    for consumer, _ in pushers.values():
        consumer.close()

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
    for key, label in (("nixl_gbps", "Baton nixl (read + verify)"),
                       ("collective_gbps", "Baton collective (Gloo, layer by layer + verify)"),
                       ("grpc_gbps", "Baton grpc (stream, layer by layer + verify)"),
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
