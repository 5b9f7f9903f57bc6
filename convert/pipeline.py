"""Run a plan: read -> transform -> write, one row chunk at a time, three stages at once.

A reader thread reads base rows ahead, the calling thread computes, and a writer
thread writes behind, so disk reads and writes overlap compute. Chunks live in
small pools of reused buffers: host memory stays at a few chunks whatever the
model size, and no time goes to page-faulting fresh allocations.
"""

from __future__ import annotations

import math
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from convert.lora import BiasDelta, LowRankDelta
from convert.plan import OutputTensor
from formats.safetensors_file import DTYPES, TensorInfo, read_tensor
from formats.writer import ShardWriter

DEFAULT_CHUNK_BYTES = 8 << 20  # one I/O chunk, counted at 4 bytes an element
CPU_TILE_ELEMENTS = 1 << 17  # 512 KiB of fp32: a tile's temporaries stay in the CPU's cache
DEPTH = 2  # chunks in flight between two stages


@dataclass
class Work:
    out: OutputTensor
    start: int = 0
    stop: int = 0
    rows: torch.Tensor | None = None  # base rows [start, stop); None for a file-to-file copy
    buffer: torch.Tensor | None = None  # the pooled buffer ``rows`` lives in
    parts: Factors | None = None  # fp32 LoRA factors, with the first chunk of a tensor


def row_chunks(shape: tuple[int, ...], max_elements: int) -> list[tuple[int, int]]:
    """Row ranges of at most ``max_elements`` elements each.

    Never a single-row range of a multi-row tensor: a one-row product goes through
    GEMV, which rounds differently from the GEMM that PEFT uses for the whole matrix.
    """
    rows = shape[0] if shape else 1
    if rows == 0:
        return [(0, 0)]
    per = max(2, max_elements // max(1, math.prod(shape[1:])))
    bounds = [*range(0, rows, per), rows]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    return list(zip(bounds, bounds[1:], strict=False))


class Pool:
    """A fixed set of reusable byte buffers; ``take`` blocks until one is free."""

    def __init__(self, count: int, nbytes: int):
        self.nbytes = nbytes
        self.closed = threading.Event()
        self._free: queue.Queue = queue.Queue()
        for _ in range(count):
            self._free.put(torch.empty(nbytes, dtype=torch.uint8))

    def take(self, nbytes: int) -> torch.Tensor:
        if nbytes > self.nbytes:  # a chunk of very wide rows (two rows at least): a one-off buffer
            return torch.empty(nbytes, dtype=torch.uint8)
        while not self.closed.is_set():
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue
        raise RuntimeError("buffer pool closed")  # the run is being torn down after an error

    def give(self, buffer: torch.Tensor) -> None:
        if buffer.numel() == self.nbytes:
            self._free.put(buffer)


@dataclass
class Factors:
    """A delta's fp32 tensors on the compute device; ``scale`` is what is left to multiply after the product."""

    tensors: dict[str, torch.Tensor]
    scale: float

    def to(self, device: torch.device) -> Factors:
        return Factors({k: v.to(device) for k, v in self.tensors.items()}, self.scale)


def load_factors(delta: LowRankDelta | BiasDelta) -> Factors:
    if isinstance(delta, BiasDelta):
        return Factors({"bias": read_tensor(delta.bias).float()}, delta.scaling)
    A, B = read_tensor(delta.A).float(), read_tensor(delta.B).float()
    if exact_to_prescale(A, B, delta.scaling):
        return Factors({"A": A, "B": B * delta.scaling}, 1.0)
    return Factors({"A": A, "B": B}, delta.scaling)


def exact_to_prescale(A: torch.Tensor, B: torch.Tensor, scaling: float) -> bool:
    """Whether ``(scaling * B) @ A`` is bit-identical to PEFT's ``(B @ A) * scaling``, saving a pass.

    True when scaling is a power of two >= 1 and no product ``B[i,k] * A[k,j]`` is
    subnormal: every product, FMA and sum is then scaled exactly, rounding included.
    """
    if scaling < 1 or math.frexp(scaling)[0] != 0.5:
        return False
    a, b = A.abs(), B.abs()
    a_min, b_min = a[a > 0], b[b > 0]
    if a_min.numel() == 0 or b_min.numel() == 0:
        return True
    tiny = float(a_min.min()) * float(b_min.min()) >= 2.0**-126
    bounded = float(a.max()) * float(b.max()) * scaling * A.shape[0] < 1e37
    return tiny and bounded


def read_work(tensors: Iterable[OutputTensor], chunk_elements: int, pool: Pool) -> Iterator[Work]:
    for out in tensors:
        if out.byte_copy:
            yield Work(out)
            continue
        parts = load_factors(out.delta) if out.delta is not None else None
        for start, stop in row_chunks(out.shape, chunk_elements):
            buffer = pool.take((stop - start) * out.source.row_bytes)
            rows = read_tensor(out.source, start, stop, buffer)
            yield Work(out, start, stop, rows, buffer, parts if start == 0 else None)


def in_thread(items: Iterator, depth: int = DEPTH) -> Iterator:
    """Run an iterator in a background thread, at most ``depth`` items ahead; its errors re-raise here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # handed to the consumer, which re-raises it
            put(e)

    thread = threading.Thread(target=run, name="convert-reader", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


class WriteBehind:
    """Writes chunks in order in a background thread, so that the next chunk computes meanwhile."""

    def __init__(self, writer: ShardWriter, on_written: Callable[[int], None], release: Callable[[torch.Tensor], None]):
        self.writer, self.on_written, self.release = writer, on_written, release
        self._q: queue.Queue = queue.Queue(maxsize=DEPTH)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="convert-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._q.get()) is not None:
            if self._error is not None:
                continue  # drain after a failure; the error is raised in the caller
            name, data, buffer = job
            try:
                before = self.writer.bytes_written
                if isinstance(data, TensorInfo):
                    self.writer.copy(name, data)
                else:
                    self.writer.write(name, data)
                self.on_written(self.writer.bytes_written - before)
            except BaseException as e:
                self._error = e
            if buffer is not None:
                self.release(buffer)

    def put(self, name: str, data: torch.Tensor | TensorInfo, buffer: torch.Tensor | None = None) -> None:
        if self._error is not None:
            raise self._error
        self._q.put((name, data, buffer))

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


def add_delta(
    work: Work, parts: Factors, out: torch.Tensor, tile_elements: int, scratch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """out = base rows + delta, tile by tile, with the rounding of PEFT's merge.

    PEFT computes ``delta = (B @ A) * scaling`` in fp32, then ``weight += delta`` on
    the base dtype, which adds in fp32 and rounds once to the weight's dtype. Here
    the same fp32 values are added in cache-sized tiles (a mixed-dtype add is
    several times slower on the CPU than converting first) and rounded once.
    """
    delta, f = work.out.delta, parts.tensors
    for t0, t1 in row_chunks(tuple(work.rows.shape), tile_elements):
        lo, hi = work.start + t0, work.start + t1
        n = work.rows[t0:t1].numel()
        w = scratch[0][:n].view(work.rows[t0:t1].shape)
        w.copy_(work.rows[t0:t1])
        if isinstance(delta, BiasDelta):
            d = f["bias"][lo:hi] * parts.scale
        elif delta.transposed:  # rows of W are columns of B @ A
            d = torch.mm(f["B"], f["A"][:, lo:hi], out=scratch[1][:n].view(-1, hi - lo)).T
        else:
            d = torch.mm(f["B"][lo:hi], f["A"], out=scratch[1][:n].view(hi - lo, -1))
        if parts.scale != 1.0 and not isinstance(delta, BiasDelta):
            d.mul_(parts.scale)
        w.add_(d)
        out[t0:t1].copy_(w)


def run_plan(
    tensors: list[OutputTensor],
    writer: ShardWriter,
    device: torch.device,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    on_progress: Callable[[int], None] = lambda n: None,
) -> None:
    chunk_elements = max(1, chunk_bytes // 4)
    # A chunk or tile may hold one row more than its budget (see row_chunks), and never fewer than two.
    row = max_row(tensors)
    in_pool, out_pool = (Pool(DEPTH + 2, 4 * max(chunk_elements + row, 3 * row)) for _ in range(2))
    on_cpu = device.type == "cpu"
    tile_elements = CPU_TILE_ELEMENTS if on_cpu else chunk_elements
    scratch_elements = max(tile_elements + row, 3 * row)
    scratch = tuple(torch.empty(scratch_elements, dtype=torch.float32, device=device) for _ in range(2))
    sink = WriteBehind(writer, on_progress, out_pool.give)
    parts: Factors | None = None
    works = in_thread(read_work(tensors, chunk_elements, in_pool))
    threads = torch.get_num_threads()
    if on_cpu:
        # Leave a core to the reader and writer threads: torch's spinning OpenMP workers
        # otherwise fight them for it, and a 2-core merge runs several times slower.
        torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 2) - 1)))
    try:
        for work in works:
            out = work.out
            if work.rows is None:
                sink.put(out.name, out.source)
                continue
            if work.parts is not None:
                parts = work.parts.to(device)
            dtype = DTYPES[out.dtype]
            buffer = out_pool.take(work.rows.numel() * dtype.itemsize)
            host_out = buffer[: work.rows.numel() * dtype.itemsize].view(dtype).view(work.rows.shape)
            rows = work.rows if on_cpu else work.rows.to(device)
            if out.delta is None:
                host_out.copy_(rows)
            elif on_cpu:
                add_delta(Work(out, work.start, work.stop, rows), parts, host_out, tile_elements, scratch)
            else:
                dev_out = torch.empty(rows.shape, dtype=dtype, device=device)
                add_delta(Work(out, work.start, work.stop, rows), parts, dev_out, tile_elements, scratch)
                host_out.copy_(dev_out)
            in_pool.give(work.buffer)
            sink.put(out.name, host_out, buffer)
    finally:
        torch.set_num_threads(threads)
        in_pool.closed.set()  # unblocks a reader waiting for a buffer, so that closing it cannot hang
        works.close()
        sink.close()


def max_row(tensors: list[OutputTensor]) -> int:
    """Elements in the widest row of any tensor that is not a byte copy."""
    return max((math.prod(t.shape[1:]) for t in tensors if not t.byte_copy and len(t.shape) > 1), default=1)
