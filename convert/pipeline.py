"""Run a plan: read -> transform -> write, one row chunk at a time.

A reader thread reads base rows (and each module's small LoRA factors) ahead
into a bounded queue while the main thread computes and writes, so disk reads
overlap compute and host memory stays at a few chunks whatever the model size.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from convert.lora import BiasDelta, delta_rows
from convert.plan import OutputTensor
from formats.safetensors_file import DTYPES, read_tensor
from formats.writer import ShardWriter

DEFAULT_CHUNK_BYTES = 32 << 20  # fp32 working set of one chunk (32MiB)
_DONE = object()


@dataclass
class Work:
    out: OutputTensor
    start: int = 0
    stop: int = 0
    rows: torch.Tensor | None = None  # base rows [start, stop); None for a file-to-file copy
    parts: dict[str, torch.Tensor] | None = None  # fp32 LoRA factors, with the first chunk of a tensor


def row_chunks(shape: tuple[int, ...], chunk_bytes: int) -> list[tuple[int, int]]:
    """Row ranges whose fp32 size stays under ``chunk_bytes``.

    Never a single-row chunk of a multi-row tensor: a one-row product goes through
    GEMV, which rounds differently from the GEMM that PEFT uses for the whole matrix.
    """
    rows = shape[0] if shape else 1
    per = max(2, chunk_bytes // max(1, 4 * math.prod(shape[1:])))
    bounds = [*range(0, rows, per), rows]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    return list(zip(bounds, bounds[1:]))


def read_work(tensors: list[OutputTensor], chunk_bytes: int) -> Iterator[Work]:
    for out in tensors:
        if out.byte_copy:
            yield Work(out)
            continue
        parts = None
        if out.delta is not None:
            names = ("bias",) if isinstance(out.delta, BiasDelta) else ("A", "B")
            parts = {n: read_tensor(getattr(out.delta, n)).float() for n in names}
        for start, stop in row_chunks(out.shape, chunk_bytes):
            yield Work(out, start, stop, read_tensor(out.source, start, stop), parts if start == 0 else None)


def prefetch(items: Iterator[Work], depth: int = 2) -> Iterator[Work]:
    """Iterate ``items`` in a background thread, at most ``depth`` ahead; errors re-raise here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def run() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_DONE)
        except BaseException as e:  # handed to the consumer, which re-raises it
            q.put(e)

    thread = threading.Thread(target=run, name="convert-reader", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def transform(work: Work, parts: dict[str, torch.Tensor] | None, device: torch.device) -> torch.Tensor:
    """Base rows (+ fp32 delta), cast once to the output dtype; returned on the CPU."""
    x = work.rows.to(device)
    if work.out.delta is not None:
        x = x.to(torch.float32)
        x.add_(delta_rows(work.out.delta, parts, work.start, work.stop))
    return x.to(DTYPES[work.out.dtype]).cpu()


def run_plan(
    tensors: list[OutputTensor],
    writer: ShardWriter,
    device: torch.device,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    on_progress: Callable[[int], None] = lambda n: None,
) -> None:
    parts: dict[str, torch.Tensor] | None = None
    for work in prefetch(read_work(tensors, chunk_bytes)):
        before = writer.bytes_written
        if work.rows is None:
            writer.copy(work.out.name, work.out.source)
        else:
            if work.parts is not None:
                parts = {k: v.to(device) for k, v in work.parts.items()}
            writer.write(work.out.name, transform(work, parts, device))
        on_progress(writer.bytes_written - before)
