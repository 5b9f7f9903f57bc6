"""Run a plan: read -> transform -> write, row chunk by row chunk, by several workers at once.

The writer knows every tensor's place in its shard before the first byte, so the
work is split into independent jobs (a row chunk of a tensor, or a file-to-file
copy) that a few worker threads take in plan order. While one worker reads its
chunk another computes and writes: reads overlap compute on any number of cores.
A worker computes in cache-sized tiles and writes each tile while it is still in
the CPU's cache, and reuses one read buffer: host memory stays at a few chunks
per worker whatever the model size.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from convert.execute.decode import read_rows
from convert.execute.quantize_sink import StreamingQuantizer, streaming_quantizer
from convert.kernels.dora import merge_columns, scale_rows_
from convert.options import DEFAULT_CHUNK_BYTES
from convert.plan.build import OutputTensor
from convert.plan.lora import BiasDelta, LowRankDelta, expert_factors, factor_tensors
from formats import fp8
from formats.safetensors_file import DTYPES, read_tensor
from formats.writer import ShardWriter

CPU_TILE_ELEMENTS = 1 << 19  # 2 MiB of fp32: large enough that per-call overhead stays small
MAX_WORKERS = 8


@dataclass(frozen=True)
class Work:
    """One job: rows [start, stop) of an output tensor (``rows`` once read), or a whole byte copy."""

    out: OutputTensor
    start: int = 0
    stop: int = 0
    rows: torch.Tensor | None = None


def row_chunks(shape: tuple[int, ...], max_elements: int, align: int = 1) -> list[tuple[int, int]]:
    """Row ranges of at most ``max_elements`` elements each (more where ``align`` rows are more),
    each starting at a multiple of ``align`` rows (whole quantization blocks of a 4-bit output).

    Never a single-row range of a multi-row tensor: a one-row product goes through
    GEMV, which rounds differently from the GEMM that PEFT uses for the whole matrix.
    """
    rows = shape[0] if shape else 1
    if rows == 0:
        return [(0, 0)]
    per = max(2, max_elements // max(1, math.prod(shape[1:])))
    per = max(align, per // align * align)
    bounds = [*range(0, rows, per), rows]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    return list(zip(bounds, bounds[1:], strict=False))


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
    A, B = factor_tensors(delta)
    dora = {"magnitude": read_tensor(delta.magnitude).float()} if delta.magnitude is not None else {}
    if exact_to_prescale(A, B, delta.scaling):
        return Factors({"A": A, "B": B * delta.scaling, **dora}, 1.0)
    return Factors({"A": A, "B": B, **dora}, delta.scaling)


def whole_tensor(out: OutputTensor) -> bool:
    """DoRA on a transposed weight: its norms run down the stored columns (see ``convert.kernels.dora``)."""
    return isinstance(out.delta, LowRankDelta) and out.delta.magnitude is not None and out.delta.transposed


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


def merged_tiles(
    work: Work, parts: Factors | None, tile_elements: int, scratch: tuple[torch.Tensor, ...]
) -> Iterator[tuple[int, torch.Tensor]]:
    """Output rows of one chunk, a cache-sized tile at a time: base rows (+ delta), rounded once.

    PEFT computes ``delta = (B @ A) * scaling`` in fp32, then ``weight += delta`` on
    the base dtype, which adds in fp32 and rounds once to the weight's dtype. The
    same fp32 values are added here (converting first: a mixed-dtype add is several
    times slower on the CPU) and each tile is yielded while it is still in cache.
    Yields (first row within the chunk, tile); the tile is scratch space, valid
    until the next one is produced.
    """
    delta, dtype = work.out.delta, DTYPES[work.out.dtype]
    f = parts.tensors if parts is not None else {}
    if whole_tensor(work.out):
        yield 0, merge_columns(work.rows, f["B"], f["A"], parts.scale, f["magnitude"], dtype)
        return
    if isinstance(delta, LowRankDelta) and delta.experts > 1 and delta.expert is None:
        yield from expert_stack_tiles(work, delta, parts, scratch)
        return
    for t0, t1 in row_chunks(tuple(work.rows.shape), tile_elements):
        rows = work.rows[t0:t1]
        out = scratch[2].view(dtype)[: rows.numel()].view(rows.shape)
        if delta is None:
            out.copy_(rows)
            yield t0, out
            continue
        lo, hi, n = work.start + t0, work.start + t1, rows.numel()
        w = scratch[0][:n].view(rows.shape)
        w.copy_(rows)
        if isinstance(delta, BiasDelta):
            w.add_(f["bias"][lo:hi] * parts.scale)
        elif delta.transposed:  # rows of W are columns of B @ A
            d = torch.mm(f["B"], f["A"][:, lo:hi], out=scratch[1][:n].view(-1, hi - lo)).T
            w.add_(peft_rounded(d.mul_(parts.scale) if parts.scale != 1.0 else d, delta))
        elif delta.compute_dtype is not None:
            d = torch.mm(f["B"][lo:hi], f["A"], out=scratch[1][:n].view(hi - lo, -1))
            w.add_(peft_rounded(d, delta, parts.scale))
        elif parts.scale != 1.0:
            d = torch.mm(f["B"][lo:hi], f["A"], out=scratch[1][:n].view(hi - lo, -1))
            w.add_(d.mul_(parts.scale))
        else:
            add_product(w, f["B"][lo:hi], f["A"], scratch[1][:n].view(hi - lo, -1))
        if "magnitude" in f:
            scale_rows_(w, f["magnitude"][lo:hi])
        out.copy_(w)
        yield t0, out


def peft_rounded(d: torch.Tensor, delta: LowRankDelta, scale: float = 1.0) -> torch.Tensor:
    """``d`` (fp32 ``B @ A``) times ``scale``, rounded to ``compute_dtype`` where PEFT rounds the delta
    before adding it (its ``ParamWrapper``); in place."""
    if scale != 1.0:
        d.mul_(scale)
    return d.copy_(d.to(DTYPES[delta.compute_dtype])) if delta.compute_dtype is not None else d


def expert_stack_tiles(
    work: Work, delta: LowRankDelta, parts: Factors, scratch: tuple[torch.Tensor, ...]
) -> Iterator[tuple[int, torch.Tensor]]:
    """A stack of experts stored as one tensor (rows of its first dimension are experts): one expert's
    ``W_e + delta_e`` at a time, ``delta_e`` as PEFT's ``ParamWrapper.get_delta_weight`` computes it."""
    dtype, f = DTYPES[work.out.dtype], parts.tensors
    for i in range(work.rows.shape[0]):
        rows = work.rows[i]
        A, B = expert_factors(f["A"], f["B"], delta.experts, work.start + i)
        d = torch.mm(B, A, out=scratch[1][: rows.numel()].view(B.shape[0], A.shape[1]))
        w = scratch[0][: rows.numel()].view(rows.shape)
        w.copy_(rows)
        d = peft_rounded(d, delta, parts.scale)  # PEFT: (B @ A) * scaling, then the add
        w.add_(d.T if delta.transposed else d)
        out = scratch[2].view(dtype)[: rows.numel()].view(rows.shape)
        out.copy_(w)
        yield i, out.unsqueeze(0)


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


def plan_jobs(tensors: list[OutputTensor], chunk_elements: int) -> list[Work]:
    return [
        Work(out) if out.byte_copy else Work(out, start, stop)
        for out in tensors
        for start, stop in (
            [(0, 0)]
            if out.byte_copy
            else row_chunks(
                out.shape,
                chunk_budget(out, chunk_elements),
                fp8.layout_module(out.quant).chunk_rows(out.shape, out.quant) if out.quant else 1,
            )
        )
    ]


def chunk_budget(out: OutputTensor, chunk_elements: int) -> int:
    return math.prod(out.shape) if whole_tensor(out) else chunk_elements


class Worker:
    """One thread's state: its read buffer, its scratch, and the factors of the tensor it last worked on."""

    def __init__(
        self,
        writer: ShardWriter,
        device: torch.device,
        chunk_elements: int,
        row: int,
        tile: int,
        quantizers: dict[str, StreamingQuantizer] | None = None,
    ):
        self.writer, self.device, self.tile = writer, device, tile
        self.quantizers = quantizers or {}
        # A chunk or tile may hold one row more than its budget (see row_chunks), and never fewer than two.
        # Buffers hold 8 bytes an element (the widest dtype); pages never touched cost no memory.
        self.buffer = torch.empty(8 * max(chunk_elements + row, 3 * row), dtype=torch.uint8)
        scratch = max(tile + row, 3 * row)
        self.scratch = (
            torch.empty(scratch, device=device),  # fp32 base + delta
            torch.empty(scratch, device=device),  # fp32 delta
            torch.empty(8 * scratch, dtype=torch.uint8, device=device),  # output tile, any dtype
        )
        self.factors: tuple[str, Factors | None] = ("", None)

    def run(self, job: Work) -> int:
        """Do one job; return the bytes it wrote."""
        out = job.out
        if out.byte_copy:
            self.writer.copy(out.name, out.source)
            return out.source.nbytes
        if self.factors[0] != out.name:
            loaded = load_factors(out.delta) if out.delta is not None else None
            self.factors = (out.name, loaded.to(self.device) if loaded is not None else None)
        fits = (job.stop - job.start) * out.source.row_bytes <= self.buffer.numel()
        rows = read_rows(out.source, job.start, job.stop, self.buffer if fits else None)
        if self.device.type != "cpu":
            rows = rows.to(self.device)
        row_bytes = math.prod(out.shape[1:]) * DTYPES[out.dtype].itemsize
        tiles = merged_tiles(Work(out, job.start, job.stop, rows), self.factors[1], self.tile, self.scratch)
        if out.quant is not None:  # the whole chunk (whole blocks) is quantized once merged
            merged = torch.empty(rows.shape, dtype=DTYPES[out.dtype], device=self.device)
            for t0, tile in tiles:
                merged[t0 : t0 + len(tile)] = tile
            self.quantizers[out.name].write_rows(job.start, merged)
        else:
            for t0, tile in tiles:
                self.writer.write(out.name, tile if tile.is_cpu else tile.cpu(), (job.start + t0) * row_bytes)
        return (job.stop - job.start) * row_bytes if out.shape else DTYPES[out.dtype].itemsize


def run_plan(
    tensors: list[OutputTensor],
    writer: ShardWriter,
    device: torch.device,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    on_progress: Callable[[int], None] = lambda n: None,
) -> None:
    """Run every job of the plan on a few worker threads; the first error stops them all and is raised."""
    chunk_elements = max(1, chunk_bytes // 4)
    on_cpu = device.type == "cpu"
    # On the CPU: one worker per core, each running torch single-threaded (torch's own
    # spinning OpenMP workers would fight the other workers for the cores). On a GPU:
    # two workers, so that one reads and writes while the other's chunk computes.
    count = max(1, min(MAX_WORKERS, usable_cores())) if on_cpu else 2
    tile = CPU_TILE_ELEMENTS if on_cpu else chunk_elements
    row = max_row(tensors)
    quantizers = {
        t.name: streaming_quantizer(writer, t)
        for t in tensors
        if t.quant is not None
    }
    workers = [Worker(writer, device, chunk_elements, row, tile, quantizers) for _ in range(count)]
    jobs = iter(plan_jobs(tensors, chunk_elements))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work(worker: Worker) -> None:
        while True:
            with lock:
                job = next(jobs, None) if not errors else None
            if job is None:
                return
            try:
                written = worker.run(job)
            except BaseException as e:
                with lock:
                    errors.append(e)
                return
            with lock:
                on_progress(written)

    threads = torch.get_num_threads()
    if on_cpu:
        torch.set_num_threads(1)
    try:
        pool = [threading.Thread(target=work, args=(w,), name=f"convert-worker-{i}") for i, w in enumerate(workers)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    finally:
        torch.set_num_threads(threads)
    if errors:
        raise errors[0]


def usable_cores() -> int:
    """The cores this process's workers should use: those it may run on (a pinned rank or a container sees its
    own), shared among the ranks torchrun started on this node when they were not pinned apart (else each of
    eight ranks would start a worker per core of the whole machine)."""
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if len(cores) < (os.cpu_count() or 1) or ranks <= 1:
        return len(cores)
    return max(1, len(cores) // ranks)


def max_row(tensors: list[OutputTensor]) -> int:
    """Elements in the widest row of any tensor that is not a byte copy (for a 4-bit output, in the
    group of rows that holds whole blocks, plus one: the most a chunk can exceed its budget by)."""
    return max(
        (
            math.prod(t.shape[1:]) * (fp8.layout_module(t.quant).chunk_rows(t.shape, t.quant) + 1 if t.quant else 1)
            for t in tensors
            if not t.byte_copy and len(t.shape) > 1
        ),
        default=1,
    )
