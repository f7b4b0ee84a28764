"""``baton status``: workers from etcd, with the control plane's counters."""

from __future__ import annotations

import time

import grpc

from baton.config import Settings
from baton.registry import list_workers
from baton.rpc import channel
from baton.v1 import control_plane_pb2, control_plane_pb2_grpc


async def collect_status(settings: Settings) -> dict:
    """``workers``: one row per registered worker; ``kv_backends``: per KV
    backend, placements and how they ended (None: control plane unreachable)."""
    try:
        workers = await list_workers(settings.etcd_endpoint, settings.etcd_prefix)
    except Exception as exc:  # aetcd raises its own hierarchy; all mean "no registry"
        raise RuntimeError(f"cannot read the registry from etcd at {settings.etcd_endpoint}: {exc}") from exc
    counters: dict[str, control_plane_pb2.WorkerStatus] = {}
    backends = prefix_index = policy = decisions = recent_errors = None
    reachable = True
    async with channel(settings.control_plane_address) as ch:
        try:
            response = await control_plane_pb2_grpc.ControlPlaneStub(ch).ListWorkers(
                control_plane_pb2.ListWorkersRequest(), timeout=3)
            counters = {w.worker_id: w for w in response.workers}
            backends = {b.backend: {field: getattr(b, field) for field in _BACKEND_FIELDS}
                        for b in response.kv_backends}
            prefix_index = {field: getattr(response.prefix_index, field) for field in _PREFIX_FIELDS}
            policy = response.policy
            decisions = dict(sorted(response.decisions.items()))
            recent_errors = [{"unix_s": e.unix_s, "kind": e.kind, "worker_id": e.worker_id,
                              "transfer_id": e.transfer_id, "detail": e.detail} for e in response.recent_errors]
        except grpc.aio.AioRpcError:
            reachable = False
    rows = []
    for w in sorted(workers, key=lambda w: (w.role, w.worker_id)):
        c = counters.get(w.worker_id)
        row = {"worker_id": w.worker_id, "role": w.role, "pid": w.pid, "instance": w.instance, "address": w.address,
               "kv_address": w.kv_address, "metrics_address": w.metrics_address, "model": w.model,
               "state": c.state if c else w.state, "labels": dict(w.labels)}
        row["transfers"] = None if not reachable else {
            "in_flight": c.in_flight if c else 0, "total": c.transfers_total if c else 0,
            "consumed": c.transfers_consumed if c else 0, "failed": c.transfers_failed if c else 0,
            "expired": c.transfers_expired if c else 0, "kv_bytes": c.kv_bytes if c else 0}
        row["scheduling"] = None if not reachable else {
            "prefix_source": c.prefix_source if c else "", "cached_blocks": c.cached_blocks if c else 0,
            "queued_prefill_tokens": c.queued_prefill_tokens if c else 0, "running": c.running if c else 0,
            "engine": {field: getattr(c.engine, field) for field in _ENGINE_FIELDS}
            if c and c.HasField("engine") else None}
        rows.append(row)
    return {"workers": rows, "kv_backends": backends, "prefix_index": prefix_index, "policy": policy,
            "decisions": decisions, "recent_errors": recent_errors}


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


_BACKEND_FIELDS = ("placed", "consumed", "failed", "recomputed", "expired", "bytes", "fallbacks")
_PREFIX_FIELDS = ("predicted_tokens", "hit_tokens", "exact", "reported")
_ENGINE_FIELDS = ("running", "waiting", "kv_cache_usage", "prefix_cache_queries", "prefix_cache_hits")


def render_table(status: dict) -> str:
    rows = status["workers"]
    if not rows:
        return "no workers registered"
    lines = [f"{'WORKER':<20} {'ROLE':<8} {'ADDRESS':<22} {'STATE':<6} {'MODEL':<24} {'LABELS':<20} TRANSFERS"]
    for r in rows:
        t = r["transfers"]
        counts = "control plane unreachable" if t is None else (
            f"total={t['total']} consumed={t['consumed']} failed={t['failed']} "
            f"expired={t['expired']} in_flight={t['in_flight']} kv={_size(t['kv_bytes'])}")
        labels = ",".join(f"{k}={v}" for k, v in sorted(r["labels"].items())) or "-"
        lines.append(f"{r['worker_id']:<20} {r['role']:<8} {r['address']:<22} {r['state']:<6} {r['model']:<24} "
                     f"{labels:<20} {counts}")
    if any(r.get("scheduling") for r in rows):
        decided = ", ".join(f"{reason} {count}" for reason, count in (status.get("decisions") or {}).items())
        lines += ["", f"policy: {status.get('policy') or '-'}; placements: {decided or 'none yet'}",
                  f"{'WORKER':<20} {'PREFIX INDEX':<22} {'QUEUED PREFILL':>14} {'RUNNING':>8}  ENGINE"]
        for r in rows:
            sched = r.get("scheduling")
            if not sched:
                continue
            engine = sched["engine"]
            seen = "not reported" if engine is None else (
                f"running={engine['running']} waiting={engine['waiting']} "
                f"kv={engine['kv_cache_usage']:.0%} prefix hits={engine['prefix_cache_hits']}/"
                f"{engine['prefix_cache_queries']}")
            index = f"{sched['prefix_source'] or '-'}, {sched['cached_blocks']} blocks"
            lines.append(f"{r['worker_id']:<20} {index:<22} {sched['queued_prefill_tokens']:>14} "
                         f"{sched['running']:>8}  {seen}")
        prefix = status.get("prefix_index")
        if prefix and prefix["reported"]:
            lines.append(f"prefix index: predicted {prefix['predicted_tokens']} cached tokens, engines hit "
                         f"{prefix['hit_tokens']}; exact in {prefix['exact']} of {prefix['reported']} placements")
    if status["kv_backends"]:
        lines += ["", f"{'KV BACKEND':<12} " + " ".join(f"{field.upper():>11}" for field in _BACKEND_FIELDS)]
        for name, counts in status["kv_backends"].items():
            lines.append(f"{name:<12} " + " ".join(
                f"{_size(counts[field]) if field == 'bytes' else counts[field]:>11}" for field in _BACKEND_FIELDS))
    errors = status.get("recent_errors")
    if errors:
        lines += ["", "RECENT ERRORS (newest first)"]
        for e in errors[:10]:
            when = time.strftime("%H:%M:%S", time.localtime(e["unix_s"]))
            where = " ".join(filter(None, (e["worker_id"], e["transfer_id"][:8])))
            lines.append(f"{when} {e['kind']:<16} {where:<30} {e['detail']}")
    return "\n".join(lines)
