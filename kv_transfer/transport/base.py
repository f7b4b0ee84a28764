"""The contract every KV backend meets, and the view of vLLM's paged KV cache
they share.

A backend moves one prompt's KV blocks from a producer engine (prefill) to a
consumer engine (decode). The connector's worker side drives it: ``send``
when a step completes a prompt, ``Outbound.layer_saved`` as each layer has
run (push backends start sending while later layers compute),
``Outbound.step_done`` after the forward, and ``receive`` on one of its load
threads. A pull backend (the consumer reads the producer's blocks) makes the
producer hold its blocks until ``finished_sending`` says they were read.
Every call but ``send``/``layer_saved``/``step_done`` may block; those three
run on vLLM's model thread and must not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from kv_transfer.blocks import PromptBlocks, TokenSlots, block_shape, find_block_dim
from kv_transfer.wire import KVLayout

if TYPE_CHECKING:
    from kv_transfer.connector.metadata import LoadSpec, SaveSpec


@dataclass(frozen=True)
class ParallelRank:
    """Which shard of an engine's KV cache this worker process holds: its
    heads (tensor parallel) of its layers (pipeline parallel). A transfer
    goes from producer rank i to consumer rank i, one per rank; both
    engines must be split alike (the layout hash covers the sizes)."""

    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1

    @property
    def index(self) -> int:
        return self.pp_rank * self.tp_size + self.tp_rank

    @property
    def world(self) -> int:
        return self.tp_size * self.pp_size

    def __str__(self) -> str:
        return f"tp {self.tp_rank}/{self.tp_size}, pp {self.pp_rank}/{self.pp_size}"


SINGLE_RANK = ParallelRank()


def per_rank(endpoints: list[str]) -> str:
    """One endpoint string for an engine of several ranks (in rank index
    order); an engine of one rank is published as its endpoint itself."""
    return endpoints[0] if len(endpoints) == 1 else json.dumps(endpoints)


def endpoint_for(endpoint: str, rank: ParallelRank) -> str:
    """This rank's peer in a published endpoint (see ``per_rank``)."""
    if not endpoint.startswith("["):
        return endpoint
    ranks = json.loads(endpoint)
    if len(ranks) != rank.world:
        raise ValueError(f"the peer engine has {len(ranks)} KV ranks, this one {rank.world}: "
                         "prefill and decode engines must use the same tensor and pipeline parallel sizes")
    return ranks[rank.index]


class KVCache:
    """vLLM's KV tensors of one engine (or of this rank's shard of it), one
    per attention layer, in a fixed order (sorted layer names) that producer
    and consumer share."""

    def __init__(self, kv_caches: dict[str, torch.Tensor], num_blocks: int, signature: str, block_size: int,
                 rank: ParallelRank = SINGLE_RANK, cpu_attention_isa: str = ""):
        self.names = tuple(sorted(kv_caches))
        self.layers = [kv_caches[name] for name in self.names]
        self.block_dims = [find_block_dim(t, num_blocks) for t in self.layers]
        self.num_blocks = num_blocks
        self.rank = rank
        first = self.layers[0]
        shape = block_shape(first, self.block_dims[0])
        # cpu_attention_isa: vLLM's CPU attention and the kernels it uses (see ``TokenSlots``).
        self.slots = TokenSlots.of(shape, block_size, cpu_attention_isa, first.dtype)
        self.layout = KVLayout(signature, self.names, str(first.dtype).removeprefix("torch."), block_size,
                               shape, rank.tp_size, rank.pp_size, self.slots.name)

    def prompt(self, num_tokens: int) -> PromptBlocks:
        """How a prompt of ``num_tokens`` lies in each layer's payload."""
        return PromptBlocks(num_tokens, self.slots)

    @property
    def device(self) -> torch.device:
        return self.layers[0].device


@dataclass
class Received:
    """What a load wrote into the consumer's cache."""

    bytes: int  # KV bytes that crossed the wire for this request
    # layer index → the transferred block a RestoreSpec puts back, if any
    # (only its filled slots, if the prompt ends in it)
    kept: dict[int, torch.Tensor] = field(default_factory=dict)


class Outbound(Protocol):
    """One prompt's KV leaving a producer engine."""

    def layer_saved(self, index: int, kv_layer: torch.Tensor) -> None:
        """Layer ``index`` of the prompt is in the cache. Must not block."""

    def step_done(self) -> None:
        """The forward is over: every layer was saved (or the step failed)."""


class KVBackend(Protocol):
    name: str
    holds_source_blocks: bool  # pull: the producer keeps its blocks until read

    def attach(self, cache: KVCache) -> None:
        """The engine's KV cache is allocated: register it where needed."""

    def endpoint(self) -> str:
        """How peers reach this engine's KV, published in the registry
        ("" when the worker's services publish it instead)."""

    def send(self, spec: SaveSpec) -> Outbound:
        """Open the transfer of ``spec``'s blocks to ``spec.kv_target``."""

    def receive(self, spec: LoadSpec) -> Received:
        """Bring ``spec.transfer_id``'s KV into ``spec.block_ids``; raise
        (the prompt is then recomputed) if it cannot be had or is corrupt."""

    def hold(self, req_ids: set[str], held: bool) -> None:
        """Pull backends: the scheduler delayed (``held``) or did not delay
        freeing these finished producer requests' blocks."""

    def finished_sending(self) -> set[str]:
        """Held producer requests whose blocks may now be freed."""

    def cancel(self, transfer_id: str) -> None:
        """Consumer: the request ended; a load still waiting for this
        transfer gives up now. Must not block."""

    def decline(self, transfer_id: str, source: str) -> None:
        """Consumer: this transfer will not be loaded (a local prefix hit,
        an abort). A pull producer at ``source`` may free its blocks now; a
        push backend drops whatever of it arrives."""

    def close(self) -> None: ...
