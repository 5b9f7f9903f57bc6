"""Run a plan: read -> transform -> write, one row chunk at a time.

A reader thread reads base rows ahead into a small pool of reused buffers while
the calling thread computes each chunk in cache-sized tiles and writes every
tile as soon as it is computed. Reads overlap compute; a tile is copied into the
page cache while it is still in the CPU's cache; host memory stays at a few
chunks whatever the model size, and no time goes to page-faulting new buffers.
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
from formats.safetensors_file import DTYPES, read_tensor
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


def merged_tiles(
    work: Work, parts: Factors | None, tile_elements: int, scratch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> Iterator[torch.Tensor]:
    """Output rows of one chunk, a cache-sized tile at a time: base rows (+ delta), rounded once.

    PEFT computes ``delta = (B @ A) * scaling`` in fp32, then ``weight += delta`` on
    the base dtype, which adds in fp32 and rounds once to the weight's dtype. The
    same fp32 values are added here (converting first: a mixed-dtype add is several
    times slower on the CPU) and each tile is yielded while it is still in cache.
    The yielded tensor is scratch space, valid until the next one is produced.
    """
    delta, dtype = work.out.delta, DTYPES[work.out.dtype]
    f = parts.tensors if parts is not None else {}
    for t0, t1 in row_chunks(tuple(work.rows.shape), tile_elements):
        rows = work.rows[t0:t1]
        out = scratch[2].view(dtype)[: rows.numel()].view(rows.shape)
        if delta is None:
            out.copy_(rows)
            yield out
            continue
        lo, hi, n = work.start + t0, work.start + t1, rows.numel()
        w = scratch[0][:n].view(rows.shape)
        w.copy_(rows)
        if isinstance(delta, BiasDelta):
            w.add_(f["bias"][lo:hi] * parts.scale)
        elif delta.transposed:  # rows of W are columns of B @ A
            d = torch.mm(f["B"], f["A"][:, lo:hi], out=scratch[1][:n].view(-1, hi - lo)).T
            w.add_(d.mul_(parts.scale) if parts.scale != 1.0 else d)
        elif parts.scale != 1.0:
            d = torch.mm(f["B"][lo:hi], f["A"], out=scratch[1][:n].view(hi - lo, -1))
            w.add_(d.mul_(parts.scale))
        else:
            add_product(w, f["B"][lo:hi], f["A"], scratch[1][:n].view(hi - lo, -1))
        out.copy_(w)
        yield out


# (device type, rows, cols, rank) -> whether addmm rounds exactly like mm followed by add_.
_FUSED_IS_EXACT: dict[tuple, bool] = {}


def add_product(w: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scratch: torch.Tensor) -> None:
    """``w += B @ A`` with PEFT's rounding: the product rounded to fp32 first, then added.

    ``addmm(w, B, A)`` does both in one pass (about 20% faster on the CPU), but
    whether it rounds the product before adding depends on the BLAS kernel chosen
    for the shape. So it is used only for shapes where a check on real data
    (the first tile of that shape) gave identical bits.
    """
    key = (w.device.type, *w.shape, A.shape[0])
    exact = _FUSED_IS_EXACT.get(key)
    if exact:
        torch.addmm(w, B, A, out=w)
        return
    d = torch.mm(B, A, out=scratch)
    if exact is None:
        _FUSED_IS_EXACT[key] = torch.equal(torch.addmm(w, B, A), w + d)
    w.add_(d)


def run_plan(
    tensors: list[OutputTensor],
    writer: ShardWriter,
    device: torch.device,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    on_progress: Callable[[int], None] = lambda n: None,
) -> None:
    """Read ahead in a thread; compute and write tile by tile here, each tile written while in cache."""
    chunk_elements = max(1, chunk_bytes // 4)
    # A chunk or tile may hold one row more than its budget (see row_chunks), and never fewer than two.
    row = max_row(tensors)
    pool = Pool(DEPTH + 2, 4 * max(chunk_elements + row, 3 * row))
    on_cpu = device.type == "cpu"
    threads = torch.get_num_threads()
    if on_cpu:
        # Leave a core to the reader thread and the kernel's page-cache work: torch's spinning
        # OpenMP workers otherwise fight them for it, and a 2-core merge runs several times slower.
        torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 2) - 1)))
    # On the CPU each torch thread gets a cache-sized share of a tile; on a GPU a tile is a whole chunk.
    tile_elements = CPU_TILE_ELEMENTS * torch.get_num_threads() if on_cpu else chunk_elements
    scratch = tuple(torch.empty(max(tile_elements + row, 3 * row), device=device) for _ in range(3))
    parts: Factors | None = None
    works = in_thread(read_work(tensors, chunk_elements, pool))
    try:
        for work in works:
            before = writer.bytes_written
            if work.rows is None:
                writer.copy(work.out.name, work.out.source)
            else:
                if work.parts is not None:
                    parts = work.parts.to(device)
                rows = work.rows if on_cpu else work.rows.to(device)
                for tile in merged_tiles(Work(work.out, work.start, work.stop, rows), parts, tile_elements, scratch):
                    writer.write(work.out.name, tile if on_cpu else tile.cpu())
                pool.give(work.buffer)
            on_progress(writer.bytes_written - before)
    finally:
        torch.set_num_threads(threads)
        pool.closed.set()  # unblocks a reader waiting for a buffer, so that closing it cannot hang
        works.close()


def max_row(tensors: list[OutputTensor]) -> int:
    """Elements in the widest row of any tensor that is not a byte copy."""
    return max((math.prod(t.shape[1:]) for t in tensors if not t.byte_copy and len(t.shape) > 1), default=1)
