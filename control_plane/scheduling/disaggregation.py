"""Conditional disaggregation: whether the decode worker should prefill a
request itself instead of a prefill worker.

- A prompt the decode worker lacks little of (``short_tokens``, a couple of
  blocks) is prefilled there: one engine step, mixed into its decode steps
  by vLLM's chunked prefill, costs less than the hand-off.
- When the prefill pool is backed up, the decode worker takes the prompt
  if that is predicted faster, in tokens of prefill work (the scorers'
  unit): remote is the prefill worker's queue, the prompt's part it lacks
  and the hand-off (the decode request's round trip and its engine's
  admission, 50–100 ms here: about the time to prefill ``handoff_tokens``);
  local is the part the decode worker lacks, which also holds up each
  sequence decoding there (``stall_weight`` per sequence whose prompt is in;
  those still queued on prefill workers are not held up).
- Otherwise the prompt runs on a prefill worker and its KV moves.

An idle system therefore still disaggregates long prompts: prefilling one
on the decode worker would hold up whatever arrives for decoding next.
"""

from __future__ import annotations

from dataclasses import dataclass

from control_plane.scheduling.request import Candidate, SchedulingRequest

DISAGGREGATED = "disaggregated"
SHORT_UNCACHED = "short-uncached"  # the decode worker lacks little of the prompt
PREFILL_BACKLOG = "prefill-backlog"  # the prefill pool's queue outweighs the decode worker's prefill
NO_PREFILL_WORKER = "no-prefill-worker"  # none live (or none allowed): decode serves alone
REQUESTED = "requested"  # the client chose (vLLM's do_remote_prefill)
MOVED = "moved"  # a draining decode worker's running request, its KV sent on from there
REASONS = (DISAGGREGATED, SHORT_UNCACHED, PREFILL_BACKLOG, NO_PREFILL_WORKER, REQUESTED, MOVED)


@dataclass(frozen=True)
class Disaggregation:
    short_tokens: int = 256
    handoff_tokens: int = 128
    stall_weight: float = 0.5
    enabled: bool = True  # False: always disaggregate when a prefill worker exists

    def decide(self, request: SchedulingRequest, prefill: Candidate | None, decode: Candidate) -> str:
        if prefill is None:
            return NO_PREFILL_WORKER
        if not self.enabled:
            return DISAGGREGATED
        missing = decode.uncached_tokens(request)
        if missing <= self.short_tokens:
            return SHORT_UNCACHED
        if prefill.queued_prefill_tokens > 0:
            local = missing * (1 + self.stall_weight * decode.decoding)
            remote = prefill.queued_prefill_tokens + prefill.uncached_tokens(request) + self.handoff_tokens
            if local < remote:
                return PREFILL_BACKLOG
        return DISAGGREGATED
