"""A running request handed, with its KV, to another engine (a draining
decode worker's): the worker service writes a note, then aborts the
request; the connector's scheduler half, seeing the abort, takes the note
and its worker half sends (or offers) the KV of the note's tokens before
the blocks go, and leaves word that it did (``mark_sent``), which the
worker service waits for before it says where the KV is.

A file per request, because the note crosses from the worker service's
process into the engine's scheduler process, and vLLM's abort carries no
payload. Written whole, then renamed: the scheduler never reads half a note.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class HandOffNote:
    transfer_id: str
    kv_target: str  # the receiving engine's endpoint on ``backend``
    backend: str
    num_tokens: int  # the request's first tokens whose KV moves
    traceparent: str = ""  # the HandOff call's: the send joins the request's trace


def _path(directory: Path, request_id: str) -> Path:
    return directory / f"{request_id}.json"


def _sent_path(directory: Path, request_id: str) -> Path:
    return directory / f"{request_id}.sent"


def _caller_request_id(engine_request_id: str) -> str:
    """vLLM suffixes the caller's request id with ``-`` and 8 characters."""
    return engine_request_id.rsplit("-", 1)[0]


def _write_whole(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


def write_note(directory: Path, request_id: str, note: HandOffNote) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    _write_whole(_path(directory, request_id), json.dumps(asdict(note)))


def take_note(directory: Path, engine_request_id: str) -> HandOffNote | None:
    """The note for an engine request, removed once read; None if there is
    none."""
    path = _path(directory, _caller_request_id(engine_request_id))
    try:
        note = HandOffNote(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return note


def mark_sent(directory: Path, engine_request_id: str, error: str = "") -> None:
    """The engine's word on a hand-off: its KV is sent or offered (or, with
    ``error``, could not be)."""
    _write_whole(_sent_path(directory, _caller_request_id(engine_request_id)), error)


async def until_sent(directory: Path, request_id: str, timeout_s: float) -> str | None:
    """Wait for the engine's word on the hand-off of ``request_id``: "" once
    its KV is sent or offered, the error if it could not be, None if no
    word came within ``timeout_s``."""
    path = _sent_path(directory, request_id)
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(FileNotFoundError):
            error = path.read_text()
            path.unlink()
            return error
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(0.005)  # a file another process writes: no event to wait on
