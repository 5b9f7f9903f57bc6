"""Run a plan on one or more GPUs (``--device cuda``, ``cuda:N``, ``cuda:0,cuda:1``, ``cuda:all``).

On a GPU the arithmetic of a merge, a dequantization or a quantization is nothing; the time goes in moving
bytes disk -> host -> GPU -> host -> disk. So every tensor that needs arithmetic flows through a three-stage
pipeline per GPU, each stage on its own thread (and, on the GPU, its own CUDA stream):

    reader:  pread the stored parts of rows of tensor k+1 into a pinned host buffer
    GPU:     copy them in (copy stream); decode them (16-bit rows as they are, 4-bit codes and FP8 values
             with their scales by their kernels), merge the delta, quantize for a quantized output (compute
             stream); copy the result's serialized pieces back into the same pinned buffer (copy-back stream)
    writer:  wait for the copy-back of tensor k-1, pwrite each piece at its planned offset

A fixed set of ``DEPTH`` (pinned host buffer, device buffer) slots circulates between the stages: a stage
that runs ahead blocks on the next free slot, so host memory stays at a few chunks whatever the model size.
Chunks are whole tensors up to ``GPU_CHUNK_BYTES`` (counted at 4 bytes an element, as ``--chunk-size``), row
chunks beyond, in whole quantization blocks of the input and of the output.

Everything else (untouched tensors copied file-to-file, plain casts, ``lora_bias`` deltas, expert stacks) runs
meanwhile on the CPU pipeline's workers. With several devices each GPU gets its own pipeline and a share of
the tensors, balanced by bytes.
"""

from __future__ import annotations

import math
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from convert.clock import StageClock, say
from convert.execute.cpu import Work, chunk_budget, row_chunks, run_plan, whole_tensor
from convert.execute.decode import block_absmax, read_rows
from convert.execute.quantize_sink import Piece, StreamingQuantizer, streaming_quantizer
from convert.kernels import fp8 as fp8_kernel
from convert.kernels import quant
from convert.options import DEFAULT_CHUNK_BYTES
from convert.plan.build import OutputTensor
from convert.plan.lora import LowRankDelta
from convert.readahead import available_memory
from formats import bnb, fp8
from formats.safetensors_file import DTYPES, read_tensor
from formats.writer import ShardWriter

GPU_CHUNK_BYTES = 64 << 20  # used when --chunk-size is left at the CPU's cache-sized default (32 MB of bf16)
DEPTH = 3  # slots per GPU: one being read, one on the GPU, one being written
GPU_DTYPES = {"BF16", "F16", "F32"}
DEVICE_DECODED = (bnb.Packed4bit, fp8.BlockFP8)  # layouts whose stored parts go to the GPU as they are


def on_gpu(out: OutputTensor) -> bool:
    """Whether a tensor needs the GPU's arithmetic: a whole LoRA/DoRA delta, a weight stored 4-bit or FP8,
    or a quantized output (expert stacks, slices, bias deltas and plain casts go through the CPU workers)."""
    delta = out.delta
    if out.byte_copy or not {out.source.dtype, out.dtype} <= GPU_DTYPES:
        return False
    if delta is not None:
        return isinstance(delta, LowRankDelta) and delta.whole
    return out.quant is not None or isinstance(out.source.layout, DEVICE_DECODED)


# ------------------------------------------------------------------ jobs and their bytes


@dataclass(frozen=True)
class Part:
    """One stored part of a job's input, at ``offset`` bytes into the slot (host and device alike)."""

    offset: int
    nbytes: int


@dataclass(frozen=True)
class GpuJob:
    """Rows of one output tensor, and how its input travels: ``layout`` is the 4-bit or FP8 weight whose
    stored parts go to the GPU (None: 16-bit rows, read or dequantized on the host); ``parts`` are where
    they sit in the slot."""

    work: Work
    layout: bnb.Packed4bit | fp8.BlockFP8 | None
    parts: tuple[Part, ...]

    @property
    def elements(self) -> int:
        return (self.work.stop - self.work.start) * math.prod(self.work.out.shape[1:])

    @property
    def input_bytes(self) -> int:
        return self.parts[-1].offset + self.parts[-1].nbytes

    @property
    def output_bytes(self) -> int:
        return aligned(self.elements * DTYPES[self.work.out.dtype].itemsize)

    @property
    def sizes(self) -> tuple[int, int]:
        """(host bytes, device bytes): the host holds the input, then the output's pieces (a quantized output's
        are fewer bytes than the 16-bit rows they come from, but for alignment); the device the 16-bit output,
        then the input after it."""
        return max(self.input_bytes, self.output_bytes + 256), self.output_bytes + self.input_bytes


def aligned(nbytes: int) -> int:
    return -(-nbytes // 64) * 64


def packed_4bit(out: OutputTensor, chunk_rows: int) -> bnb.Packed4bit | None:
    """The 4-bit weight whose codes go to the GPU as they are stored (dequantized by the merge kernel), when
    every row chunk starts on a quantization block and rows are whole bytes; else None (the reader then
    dequantizes on the CPU)."""
    q = out.source.layout
    cols = math.prod(out.shape[1:])
    if isinstance(q, bnb.Packed4bit) and cols % 2 == 0 and chunk_rows * cols % q.blocksize == 0:
        return q
    return None


def input_parts(work: Work, layout: bnb.Packed4bit | fp8.BlockFP8 | None) -> tuple[Part, ...]:
    """Where the input of rows [start, stop) lies in a slot: 16-bit rows; or 4-bit codes and their fp32
    absmax; or FP8 values and the fp32 scales of their block rows."""
    n = (work.stop - work.start) * math.prod(work.out.shape[1:])
    if isinstance(layout, bnb.Packed4bit):
        first = Part(0, n // 2)
        return first, Part(aligned(first.nbytes), 4 * -(-n // layout.blocksize))
    if isinstance(layout, fp8.BlockFP8):
        first = Part(0, n)
        return first, Part(aligned(n), 4 * scale_count(layout, work.start, work.stop))
    return (Part(0, n * host_dtype(work).itemsize),)


def host_dtype(work: Work) -> torch.dtype:
    """The dtype 16/32-bit input rows reach the host in: the stored one, or fp32 for an LLM.int8 weight (its
    reader dequantizes it to the fp32 values PEFT merges into, whatever the model's dtype)."""
    return torch.float32 if isinstance(work.out.source.layout, bnb.Int8Rows) else DTYPES[work.out.source.dtype]


def scale_count(q: fp8.BlockFP8, start: int, stop: int) -> int:
    if q.block is None:
        return 1
    return (-(-stop // q.block[0]) - start // q.block[0]) * -(-q.weight.shape[1] // q.block[1])


def gpu_jobs(tensors: list[OutputTensor], chunk_elements: int) -> list[GpuJob]:
    """Row chunks of a multiple of 16 rows where possible (every chunk then hits the kernels already compiled
    for the first: Triton specializes on sizes and pointers divisible by 16), in whole blocks of a quantized
    output."""
    jobs = []
    for t in tensors:
        cols = math.prod(t.shape[1:])
        align = fp8.layout_module(t.quant).chunk_rows(t.shape, t.quant) if t.quant else 1
        rows = max(chunk_elements // cols // 16 * 16, 1)
        rows = max(align, rows // align * align) if not whole_tensor(t) else t.shape[0]
        layout = t.source.layout
        if isinstance(layout, bnb.Packed4bit):
            layout = packed_4bit(t, rows)
        elif not isinstance(layout, fp8.BlockFP8):
            layout = None
        for a, b in row_chunks(t.shape, chunk_budget(t, rows * cols), align):
            work = Work(t, a, b)
            jobs.append(GpuJob(work, layout, input_parts(work, layout)))
    return jobs


def assign(tensors: list[OutputTensor], count: int) -> list[list[OutputTensor]]:
    """Share tensors among ``count`` devices: largest first to the least loaded, each share kept in plan order."""
    loads, shares = [0] * count, [[] for _ in range(count)]
    order = {t.name: i for i, t in enumerate(tensors)}
    for t in sorted(tensors, key=lambda t: -math.prod(t.shape)):
        i = loads.index(min(loads))
        loads[i] += math.prod(t.shape)
        shares[i].append(t)
    return [sorted(share, key=lambda t: order[t.name]) for share in shares]


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


# ------------------------------------------------------------------ the three stages' work on one job


@dataclass
class Slot:
    """One chunk in flight: pinned host bytes (input, then output) and device bytes (output, input after it)."""

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


def read_input(job: GpuJob, host: torch.Tensor) -> None:
    """The job's stored parts into the pinned host buffer, at their offsets."""
    work, q = job.work, job.layout
    source, cols = work.out.source, math.prod(work.out.shape[1:])
    at = [host[p.offset : p.offset + p.nbytes] for p in job.parts]
    if isinstance(q, bnb.Packed4bit):  # the stored codes and the block absmax (double quant undone)
        e0, bs = work.start * cols, q.blocksize
        at[0].copy_(bnb.read_bytes(q.packed, e0 // 2, e0 // 2 + job.parts[0].nbytes))
        at[1].view(torch.float32).copy_(block_absmax(q, e0 // bs, e0 // bs + job.parts[1].nbytes // 4))
    elif isinstance(q, fp8.BlockFP8):  # the e4m3 values and the scales of their block rows, as fp32
        at[0].copy_(read_tensor(q.weight, work.start, work.stop).view(torch.uint8).reshape(-1))
        bm = q.block[0] if q.block else 1
        scales = read_tensor(q.scale, work.start // bm, -(-work.stop // bm)) if q.block else read_tensor(q.scale)
        at[1].view(torch.float32).copy_(scales.float().reshape(-1))
    elif source.layout is None:
        read_tensor(source, work.start, work.stop, at[0])
    else:  # dequantized by its reader on the host
        rows = read_rows(source, work.start, work.stop, at[0])
        if rows.data_ptr() != at[0].data_ptr():
            at[0].view(rows.dtype).copy_(rows.reshape(-1))


def device_rows(job: GpuJob, raw: torch.Tensor, device: torch.device):
    """The job's input rows on the device: a dense tensor, or the 4-bit weight the merge kernel dequantizes
    tile by tile (``raw``: the device bytes the parts were copied to)."""
    from convert.kernels import merge_triton as mt  # imports triton: only where a GPU computes
    from convert.kernels.quant_triton import code_table

    work, q = job.work, job.layout
    rows = (work.stop - work.start, *work.out.shape[1:])
    at = [raw[p.offset : p.offset + p.nbytes] for p in job.parts]
    if isinstance(q, bnb.Packed4bit):
        return mt.Packed4bit(at[0], at[1].view(torch.float32), q.blocksize, code_table(q.quant_type, device),
                             rows, q.dtype)  # fmt: skip
    if isinstance(q, fp8.BlockFP8):
        values = at[0].view(fp8_kernel.FP8_DTYPE).view(rows)
        scales = at[1].view(torch.float32)
        scales = scales.view(-1, -(-rows[1] // q.block[1])) if q.block else scales.reshape(())
        return fp8_kernel.dequantize(values, scales, q.block, work.start, q.dtype)
    return at[0].view(host_dtype(work)).view(rows)


def transformed(job: GpuJob, base, result: torch.Tensor, factors: DeviceFactors | None) -> torch.Tensor:
    """The output rows: the base with its delta merged (the fused kernel), or the base as it is, in
    ``result``'s dtype."""
    from convert.kernels import merge_triton as mt

    work = job.work
    if factors is None:
        if isinstance(base, mt.Packed4bit):
            q = job.layout
            base = quant.dequantize_blocks_4bit(
                base.packed, base.absmax, q.blocksize, q.quant_type, base.shape, q.dtype
            )
        return result.copy_(base)
    magnitude = factors.magnitude  # row-norm magnitudes follow the chunk's rows; column norms come with whole tensors
    if magnitude is not None and factors.axis == 1:
        magnitude = magnitude[work.start : work.stop]
    L = factors.L[work.start : work.stop]
    return mt.merge_triton(base, L, factors.R, factors.scale, result.dtype, magnitude, factors.axis, out=result)


def output_pieces(job: GpuJob, rows: torch.Tensor, quantizers: dict[str, StreamingQuantizer]) -> list[Piece]:
    """What the writer gets: the rows at their offset, or the serialized pieces of their quantization."""
    out, work = job.work.out, job.work
    if out.quant is not None:
        return quantizers[out.name].pieces(work.start, rows)
    return [(out.name, rows, work.start * math.prod(out.shape[1:]) * rows.element_size())]


def copy_back(pieces: list[Piece], host: torch.Tensor) -> list[Piece]:
    """Start copying the device pieces into ``host`` (one after another, aligned) on the current stream; pieces
    already on the host (a quant-state blob) pass as they are."""
    copied, at = [], 0
    for name, values, offset in pieces:
        if not values.is_cuda:
            copied.append((name, values, offset))
            continue
        nbytes = values.numel() * values.element_size()
        if at + nbytes <= host.numel():
            view = host[at : at + nbytes].view(values.dtype).view(values.shape)
            at = aligned(at + nbytes)
        else:  # more pieces than a 16-bit output's bytes (int8 of one-column rows): pinned memory of their own
            view = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        view.copy_(values, non_blocking=True)
        # The piece was allocated on the compute stream: without this the allocator could hand its memory to the
        # next job's kernels before this stream has copied it out.
        values.record_stream(torch.cuda.current_stream())
        copied.append((name, view, offset))
    return copied


# ------------------------------------------------------------------ one device's pipeline


@dataclass
class Pipeline:
    """The state the three stage threads of one device share."""

    device: torch.device
    writer: ShardWriter
    quantizers: dict[str, StreamingQuantizer]
    progress: Callable[[int], None]
    stop: threading.Event
    free: queue.Queue = field(default_factory=queue.Queue)
    to_gpu: queue.Queue = field(default_factory=queue.Queue)
    to_write: queue.Queue = field(default_factory=queue.Queue)
    errors: list[BaseException] = field(default_factory=list)
    clocks: dict[str, StageClock] = field(default_factory=lambda: {s: StageClock() for s in ("read", "gpu", "write")})

    def take_slot(self, job: GpuJob) -> Slot:
        """A free slot, with bigger buffers of its own for a job that does not fit (a whole transposed DoRA weight)."""
        with self.clocks["read"].waiting():
            slot = self.free.get()
        host, dev = job.sizes
        if host > slot.host.numel() or dev > slot.device.numel():
            return Slot(pinned(host), torch.empty(dev, dtype=torch.uint8, device=self.device), pooled=slot)
        return slot

    def read(self, jobs: list[GpuJob]) -> None:
        for job in jobs:
            if self.stop.is_set():
                break
            slot = self.take_slot(job)
            read_input(job, slot.host)
            self.to_gpu.put((job, slot))
        self.to_gpu.put(None)

    def compute(self) -> None:
        copy_in, run, copy_out = (torch.cuda.Stream(self.device) for _ in range(3))
        factors: DeviceFactors | None = None
        while (item := self.next(self.to_gpu, "gpu")) is not None:
            job, slot = item
            out = job.work.out
            raw = slot.device[job.output_bytes : job.output_bytes + job.input_bytes]
            with torch.cuda.stream(copy_in):
                raw.copy_(slot.host[: job.input_bytes], non_blocking=True)
            run.wait_stream(copy_in)
            with torch.cuda.stream(run):
                if out.delta is not None and (factors is None or factors.name != out.name):
                    factors = device_factors(out, self.device)
                dtype, shape = DTYPES[out.dtype], (job.work.stop - job.work.start, *out.shape[1:])
                result = slot.device[: job.elements * dtype.itemsize].view(dtype).view(shape)
                delta = factors if out.delta is not None else None
                rows = transformed(job, device_rows(job, raw, self.device), result, delta)
                pieces = output_pieces(job, rows, self.quantizers)
            copy_out.wait_stream(run)
            with torch.cuda.stream(copy_out):
                pieces = copy_back(pieces, slot.host)
                slot.done = torch.cuda.Event()
                slot.done.record(copy_out)
            self.to_write.put((job, slot, pieces))
        self.to_write.put(None)

    def write(self) -> None:
        while (item := self.next(self.to_write, "write")) is not None:
            job, slot, pieces = item
            with self.clocks["write"].waiting():
                slot.done.synchronize()
            for name, values, offset in pieces:
                self.writer.write(name, values, offset)
            self.progress(job.elements * DTYPES[job.work.out.dtype].itemsize)
            self.free.put(slot.pooled or slot)

    def next(self, source: queue.Queue, stage: str):
        with self.clocks[stage].waiting():
            return source.get()

    def report_times(self) -> None:
        say(f"{self.device} pipeline: " + ", ".join(clock.line(stage) for stage, clock in self.clocks.items()))

    def guarded(self, stage: Callable[[], None], downstream: queue.Queue | None) -> Callable[[], None]:
        """``stage`` recording its error: the other stages then stop at their next job."""

        def run_stage() -> None:
            try:
                with torch.cuda.device(self.device):
                    stage()
            except BaseException as e:
                self.errors.append(e)
                self.stop.set()
                if downstream is not None:
                    downstream.put(None)  # let the next stage finish
                for _ in range(DEPTH):  # unblock a reader waiting for a slot; it stops at its next job
                    self.free.put(Slot(torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8)))

        return run_stage


def run_device(jobs: list[GpuJob], pipeline: Pipeline) -> None:
    """The reader -> GPU -> writer pipeline of one device; raises the first error of any stage."""
    if not jobs:
        return
    sizes = [job.sizes for job in jobs if not whole_tensor(job.work.out)] or [(0, 0)]
    host_bytes, device_bytes = max(s[0] for s in sizes), max(s[1] for s in sizes)
    for _ in range(DEPTH):
        device = torch.empty(device_bytes, dtype=torch.uint8, device=pipeline.device)
        pipeline.free.put(Slot(pinned(host_bytes), device))
    stages = {
        "read": (lambda: pipeline.read(jobs), pipeline.to_gpu),
        "gpu": (pipeline.compute, pipeline.to_write),
        "write": (pipeline.write, None),
    }
    threads = [
        threading.Thread(target=pipeline.guarded(stage, downstream), name=f"convert-{what}-{pipeline.device}")
        for what, (stage, downstream) in stages.items()
    ]
    run_threads(threads, pipeline.errors)
    pipeline.report_times()


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


def timed_cpu(tensors: list[OutputTensor], writer: ShardWriter, chunk_bytes: int, progress: Callable[[int], None]):
    """The CPU workers' share of a GPU run (with ``CONVERT_PIPELINE_TIMES=1``, their seconds printed)."""
    clock = StageClock()
    run_plan(tensors, writer, torch.device("cpu"), chunk_bytes, progress)
    nbytes = sum(t.source.nbytes for t in tensors)
    say(f"cpu workers: {len(tensors)} tensors, {nbytes / 1e9:.2f} GB read, {clock.line('done in')}")


def run_plan_gpu(
    tensors: list[OutputTensor],
    writer: ShardWriter,
    devices: list[torch.device],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    on_progress: Callable[[int], None] = lambda n: None,
) -> None:
    """The tensors that need arithmetic through the GPU pipelines, everything else through the CPU workers,
    all at once."""
    chunk_elements = max(1, (GPU_CHUNK_BYTES if chunk_bytes == DEFAULT_CHUNK_BYTES else chunk_bytes) // 4)
    lock = threading.Lock()

    def progress(n: int) -> None:
        with lock:
            on_progress(n)

    stop = threading.Event()
    gpu = [t for t in tensors if on_gpu(t)]
    quantizers = {t.name: streaming_quantizer(writer, t) for t in gpu if t.quant is not None}
    jobs = [gpu_jobs(share, chunk_elements) for share in assign(gpu, len(devices))]
    prefetch([job.work for share in jobs for job in share])
    cpu_work = [t for t in tensors if not on_gpu(t)]
    tasks: list[Callable[[], None]] = [lambda: timed_cpu(cpu_work, writer, chunk_bytes, progress)]
    tasks += [
        lambda share=share, device=device: run_device(share, Pipeline(device, writer, quantizers, progress, stop))
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
