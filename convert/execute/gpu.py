"""Run a plan on one or more GPUs (``--device cuda``, ``cuda:N``, ``cuda:0,cuda:1``, ``cuda:all``).

On a GPU the arithmetic of a merge is nothing; the time goes in moving bytes disk ->
host -> GPU -> host -> disk. So every adapted tensor flows through a three-stage
pipeline per GPU, each stage on its own thread (and, on the GPU, its own CUDA stream):

    reader:  pread rows of tensor k+1 into a pinned host buffer
    GPU:     copy it in (copy stream), merge it in place with the Triton kernel (compute
             stream), copy the result back into the same pinned buffer (copy-back stream)
    writer:  wait for the copy-back of tensor k-1, pwrite it at its planned offset

A fixed set of ``DEPTH`` (pinned host buffer, device buffer) slots circulates between the
stages: a stage that runs ahead blocks on the next free slot, so host memory stays at a
few chunks whatever the model size. Chunks are whole tensors up to ``GPU_CHUNK_BYTES``
(counted at 4 bytes an element, as ``--chunk-size``), row chunks beyond.

Everything else (untouched tensors copied file-to-file, casts, ``lora_bias`` deltas) runs
meanwhile on the CPU pipeline's workers. With several devices each GPU gets its own
pipeline and a share of the adapted tensors, balanced by bytes.
"""

from __future__ import annotations

import math
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from convert.execute.cpu import Work, chunk_budget, row_chunks, run_plan, whole_tensor
from convert.execute.decode import block_absmax, read_rows
from convert.options import DEFAULT_CHUNK_BYTES
from convert.plan.build import OutputTensor
from convert.plan.lora import LowRankDelta
from convert.readahead import available_memory
from formats import bnb
from formats.safetensors_file import DTYPES, read_tensor
from formats.writer import ShardWriter

GPU_CHUNK_BYTES = 64 << 20  # used when --chunk-size is left at the CPU's cache-sized default (32 MB of bf16)
DEPTH = 3  # slots per GPU: one being read, one on the GPU, one being written
GPU_DTYPES = {"BF16", "F16", "F32"}


def on_gpu(out: OutputTensor) -> bool:
    """A LoRA/DoRA delta on a 16/32-bit or 4-bit weight, written unquantized: what the fused kernel does.
    (A quantized output goes through the CPU workers.)"""
    plain = isinstance(out.delta, LowRankDelta) and out.delta.whole  # expert stacks and slices: CPU workers
    return plain and {out.source.dtype, out.dtype} <= GPU_DTYPES and out.quant is None


def packed_4bit(out: OutputTensor, chunk_rows: int) -> bnb.Packed4bit | None:
    """The 4-bit weight whose codes go to the GPU as they are stored (dequantized by the merge kernel), when
    every row chunk starts on a quantization block and rows are whole bytes; else None (the reader then
    dequantizes on the CPU)."""
    q = out.source.layout
    cols = math.prod(out.shape[1:])
    if isinstance(q, bnb.Packed4bit) and cols % 2 == 0 and chunk_rows * cols % q.blocksize == 0:
        return q
    return None


@dataclass(frozen=True)
class PackedLayout:
    """Where a chunk of 4-bit codes and its fp32 absmax sit in a slot (host and device alike)."""

    packed_bytes: int
    absmax_at: int
    blocks: int

    @property
    def nbytes(self) -> int:
        return self.absmax_at + 4 * self.blocks


def packed_layout(job: Work, q: bnb.Packed4bit) -> PackedLayout:
    n = (job.stop - job.start) * math.prod(job.out.shape[1:])
    return PackedLayout(n // 2, output_offset(n // 2), -(-n // q.blocksize))


def assign(tensors: list[OutputTensor], count: int) -> list[list[OutputTensor]]:
    """Share tensors among ``count`` devices: largest first to the least loaded, each share kept in plan order."""
    loads, shares = [0] * count, [[] for _ in range(count)]
    order = {t.name: i for i, t in enumerate(tensors)}
    for t in sorted(tensors, key=lambda t: -math.prod(t.shape)):
        i = loads.index(min(loads))
        loads[i] += math.prod(t.shape)
        shares[i].append(t)
    return [sorted(share, key=lambda t: order[t.name]) for share in shares]


@dataclass
class Slot:
    """One chunk in flight: pinned host bytes (input, then output) and device bytes (input, output after it)."""

    host: torch.Tensor
    device: torch.Tensor
    done: torch.cuda.Event | None = None
    pooled: Slot | None = None  # the pool's slot this one stands in for (a job too big for the pool's buffers)


@dataclass
class DeviceFactors:
    """A delta as the kernel takes it: ``L`` rows follow the stored weight's rows, ``R`` its columns."""

    name: str
    L: torch.Tensor
    R: torch.Tensor
    scale: float
    magnitude: torch.Tensor | None
    axis: int  # of the DoRA norm in the stored layout


def device_factors(out: OutputTensor, device: torch.device) -> DeviceFactors:
    delta = out.delta
    A, B = read_tensor(delta.A).float(), read_tensor(delta.B).float()
    L, R = (A.T, B.T) if delta.transposed else (B, A)
    magnitude = read_tensor(delta.magnitude).float().to(device) if delta.magnitude is not None else None
    return DeviceFactors(
        out.name,
        L.contiguous().to(device),
        R.contiguous().to(device),
        delta.scaling,
        magnitude,
        0 if delta.transposed else 1,
    )


def gpu_jobs(tensors: list[OutputTensor], chunk_elements: int) -> list[tuple[Work, bnb.Packed4bit | None]]:
    """Row chunks of a multiple of 16 rows where possible: every chunk then hits the kernels already
    compiled for the first (Triton specializes on sizes and pointers divisible by 16). Each comes with
    its 4-bit weight when its codes go to the GPU as stored."""
    jobs = []
    for t in tensors:
        cols = math.prod(t.shape[1:])
        budget = chunk_budget(t, max(chunk_elements // cols // 16 * 16, 1) * cols)
        q = packed_4bit(t, budget // cols) if not whole_tensor(t) else packed_4bit(t, t.shape[0])
        jobs += [(Work(t, a, b), q) for a, b in row_chunks(t.shape, budget)]
    return jobs


def prefetch(jobs: list[Work]) -> threading.Thread:
    """Ask the kernel to read the adapted tensors' bytes ahead (``posix_fadvise(WILLNEED)``, in plan order)
    while CUDA and Triton start, so the reader's first chunks come from memory and the disk keeps a
    queue of reads. A hint within a quarter of the available memory; failures are ignored."""

    def advise() -> None:
        budget = available_memory() // 4
        for job in jobs:
            info = job.out.source
            length = (job.stop - job.start) * info.row_bytes
            if not info.stored_as_is or budget < length:
                continue
            try:
                fd = os.open(info.path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, info.offset + job.start * info.row_bytes, length, os.POSIX_FADV_WILLNEED)
                finally:
                    os.close(fd)
            except (OSError, AttributeError):
                return
            budget -= length

    thread = threading.Thread(target=advise, daemon=True, name="convert-prefetch")
    thread.start()
    return thread


def job_bytes(job: Work, q: bnb.Packed4bit | None = None) -> tuple[int, int]:
    """(host bytes, device bytes) a job needs: output written over the input, or after it when the dtype changes
    (4-bit codes and absmax: the output first, then the codes)."""
    n = (job.stop - job.start) * math.prod(job.out.shape[1:])
    size_in, size_out = DTYPES[job.out.source.dtype].itemsize, DTYPES[job.out.dtype].itemsize
    if q is not None:
        raw = packed_layout(job, q).nbytes
        return max(raw, n * size_out), output_offset(n * size_out) + raw
    return n * max(size_in, size_out), n * size_out + (0 if size_in == size_out else output_offset(n * size_in))


def output_offset(input_bytes: int) -> int:
    """Where a job's output starts in its device buffer when it cannot overwrite the input (8-byte aligned)."""
    return -(-input_bytes // 8) * 8


def run_device(
    jobs: list[Work], writer: ShardWriter, device: torch.device, progress: Callable[[int], None], stop: threading.Event
) -> None:
    """The reader -> GPU -> writer pipeline of one device; raises the first error of any stage."""
    from convert.kernels import merge_triton as mt  # imports triton: only where a GPU merges
    from convert.kernels.quant_triton import code_table

    if not jobs:
        return
    sizes = [job_bytes(j, q) for j, q in jobs if not whole_tensor(j.out)] or [(0, 0)]
    host_bytes, device_bytes = max(s[0] for s in sizes), max(s[1] for s in sizes)
    free: queue.Queue[Slot] = queue.Queue()
    for _ in range(DEPTH):
        free.put(Slot(pinned(host_bytes), torch.empty(device_bytes, dtype=torch.uint8, device=device)))
    to_gpu: queue.Queue = queue.Queue()
    to_write: queue.Queue = queue.Queue()
    errors: list[BaseException] = []

    def take_slot(job: Work, q: bnb.Packed4bit | None) -> Slot:
        """A free slot, with bigger buffers of its own for a job that does not fit (a whole transposed DoRA weight)."""
        slot = free.get()
        host, dev = job_bytes(job, q)
        if host > slot.host.numel() or dev > slot.device.numel():
            return Slot(pinned(host), torch.empty(dev, dtype=torch.uint8, device=device), pooled=slot)
        return slot

    def read() -> None:
        for job, q in jobs:
            if stop.is_set():
                break
            slot = take_slot(job, q)
            source = job.out.source
            if q is not None:  # the stored codes and the block absmax (double quant undone: n / blocksize floats)
                layout, cols = packed_layout(job, q), math.prod(job.out.shape[1:])
                e0 = job.start * cols
                slot.host[: layout.packed_bytes].copy_(bnb.read_bytes(q.packed, e0 // 2, e0 // 2 + layout.packed_bytes))
                absmax = block_absmax(q, e0 // q.blocksize, e0 // q.blocksize + layout.blocks)
                slot.host[layout.absmax_at : layout.nbytes].view(torch.float32).copy_(absmax)
            elif source.layout is None:
                read_tensor(source, job.start, job.stop, slot.host)
            else:  # dequantized by its reader, into memory of its own
                rows = read_rows(source, job.start, job.stop)
                slot.host[: rows.nbytes].view(rows.dtype).view(rows.shape).copy_(rows)
            to_gpu.put((job, q, slot))
        to_gpu.put(None)

    def compute() -> None:
        copy_in, run, copy_out = (torch.cuda.Stream(device) for _ in range(3))
        factors: DeviceFactors | None = None
        while (item := to_gpu.get()) is not None:
            job, q, slot = item
            out, n = job.out, (job.stop - job.start) * math.prod(job.out.shape[1:])
            rows = (job.stop - job.start, *out.shape[1:])
            src_dtype, out_dtype = DTYPES[out.source.dtype], DTYPES[out.dtype]
            if q is not None:  # codes after the output; the kernel dequantizes them tile by tile
                layout, at = packed_layout(job, q), output_offset(n * out_dtype.itemsize)
                raw = slot.device[at : at + layout.nbytes]
                with torch.cuda.stream(copy_in):
                    raw.copy_(slot.host[: layout.nbytes], non_blocking=True)
                absmax = raw[layout.absmax_at :].view(torch.float32)
                base = mt.Packed4bit(raw[: layout.packed_bytes], absmax, q.blocksize, code_table(q.quant_type, device),
                                     rows, q.dtype)  # fmt: skip
            else:
                host_in = slot.host[: n * src_dtype.itemsize].view(src_dtype).view(rows)
                base = slot.device[: n * src_dtype.itemsize].view(src_dtype).view(rows)
                with torch.cuda.stream(copy_in):
                    base.copy_(host_in, non_blocking=True)
            run.wait_stream(copy_in)
            with torch.cuda.stream(run):
                if factors is None or factors.name != out.name:
                    factors = device_factors(out, device)
                f = factors
                if q is not None:
                    result = slot.device[: n * out_dtype.itemsize].view(out_dtype).view(rows)
                elif src_dtype == out_dtype:
                    result = base
                else:
                    at = output_offset(n * src_dtype.itemsize)
                    result = slot.device[at : at + n * out_dtype.itemsize].view(out_dtype).view(rows)
                # row-norm magnitudes follow the chunk's rows; column norms (axis 0) come with whole tensors
                magnitude = f.magnitude
                if magnitude is not None and f.axis == 1:
                    magnitude = magnitude[job.start : job.stop]
                L = f.L[job.start : job.stop]
                mt.merge_triton(base, L, f.R, f.scale, out_dtype, magnitude, f.axis, out=result)
            copy_out.wait_stream(run)
            with torch.cuda.stream(copy_out):
                host_out = slot.host[: n * out_dtype.itemsize].view(out_dtype).view(rows)
                host_out.copy_(result, non_blocking=True)
                slot.done = torch.cuda.Event()
                slot.done.record(copy_out)
            to_write.put((job, slot, host_out))
        to_write.put(None)

    def write() -> None:
        while (item := to_write.get()) is not None:
            job, slot, host_out = item
            slot.done.synchronize()
            row_bytes = math.prod(job.out.shape[1:]) * DTYPES[job.out.dtype].itemsize
            writer.write(job.out.name, host_out, job.start * row_bytes)
            progress(host_out.numel() * host_out.element_size())
            free.put(slot.pooled or slot)

    def guarded(stage: Callable[[], None], downstream: queue.Queue | None) -> Callable[[], None]:
        def run_stage() -> None:
            try:
                with torch.cuda.device(device):
                    stage()
            except BaseException as e:
                errors.append(e)
                stop.set()
                if downstream is not None:
                    downstream.put(None)  # let the next stage finish
                for _ in range(DEPTH):  # unblock a reader waiting for a slot; it stops at its next job
                    free.put(Slot(torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8)))

        return run_stage

    run_threads(
        [
            threading.Thread(target=guarded(read, to_gpu), name=f"convert-read-{device}"),
            threading.Thread(target=guarded(compute, to_write), name=f"convert-gpu-{device}"),
            threading.Thread(target=guarded(write, None), name=f"convert-write-{device}"),
        ],
        errors,
    )


def run_threads(threads: list[threading.Thread], errors: list[BaseException]) -> None:
    """Start and join ``threads``, then raise the first error they recorded."""
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def pinned(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def run_plan_gpu(
    tensors: list[OutputTensor],
    writer: ShardWriter,
    devices: list[torch.device],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    on_progress: Callable[[int], None] = lambda n: None,
) -> None:
    """Adapted tensors through the GPU pipelines, everything else through the CPU workers, all at once."""
    chunk_elements = max(1, (GPU_CHUNK_BYTES if chunk_bytes == DEFAULT_CHUNK_BYTES else chunk_bytes) // 4)
    lock = threading.Lock()

    def progress(n: int) -> None:
        with lock:
            on_progress(n)

    stop = threading.Event()
    shares = assign([t for t in tensors if on_gpu(t)], len(devices))
    jobs = [gpu_jobs(share, chunk_elements) for share in shares]
    prefetch([job for share in jobs for job, _ in share])
    tasks: list[Callable[[], None]] = [
        lambda: run_plan([t for t in tensors if not on_gpu(t)], writer, torch.device("cpu"), chunk_bytes, progress)
    ]
    tasks += [
        lambda share=share, device=device: run_device(share, writer, device, progress, stop)
        for share, device in zip(jobs, devices, strict=True)
    ]
    errors: list[BaseException] = []

    def guarded(task: Callable[[], None]) -> None:
        try:
            task()
        except BaseException as e:
            errors.append(e)
            stop.set()

    run_threads([threading.Thread(target=guarded, args=(task,)) for task in tasks], errors)
