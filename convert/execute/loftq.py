"""Run a LoftQ-init plan: one matrix at a time on the compute device, the next one read meanwhile.

Host memory holds the matrix being computed and the one being read ahead, whatever the model size.
``Q`` is stored bit for bit as LoftQ used it, so ``Q + scaling * B @ A`` is the approximation.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from convert.execute.decode import read_rows
from convert.kernels import quant
from convert.kernels.loftq import loftq_matrix
from convert.kernels.quant import Quantized4bit, dequantize_4bit, quantize_4bit
from convert.plan.loftq_plan import LoftQPlan, Settings, adapter_names
from formats import bnb
from formats.errors import ConvertError
from formats.safetensors_file import DTYPE_NAMES, DTYPES, TensorInfo
from formats.writer import ShardWriter


def run_loftq(
    plan: LoftQPlan,
    parts: Iterable[list[TensorInfo]],
    writers: tuple[ShardWriter, ShardWriter, ShardWriter | None],
    settings: Settings,
    device: torch.device,
    step: Callable[[int], None],
) -> dict[str, tuple[float, float]]:
    """Write every tensor of ``parts`` (the plan's order, in runs) to the 4-bit base, the adapter and the
    optional dequantized base; return each target's (LoftQ error, plain 4-bit error), in the plan's order."""
    base_writer, adapter_writer, deq_writer = writers
    errors: dict[str, tuple[float, float]] = {}
    for info, weight in (pair for part in parts for pair in stream(part, plan.roles)):
        role = plan.roles[info.name]
        if role == "copy":
            for w in (base_writer, deq_writer):
                if w is not None:
                    copy_tensor(w, info)
        else:
            result = process_linear(info, weight, role, settings, device)
            q = result["q"]
            write_4bit(base_writer, info.name, q, settings.spec)
            if role == "loftq":
                a, b = adapter_names(plan.targets[info.name])
                adapter_writer.write(a, result["A"].cpu())
                adapter_writer.write(b, result["B"].cpu())
                errors[info.name] = (result["error"], result["quant_error"])
            if deq_writer is not None:
                deq_writer.write(info.name, dequantize_4bit(q, DTYPES[info.dtype]).cpu())
        step(1)
    return errors


def stream(order: list[TensorInfo], roles: dict[str, str]):
    """Yield (info, tensor) in file order, the next matrix read by a helper thread while this one computes.

    Copied tensors come with ``None``: the writer copies them file-to-file."""
    with ThreadPoolExecutor(1, thread_name_prefix="loftq-read") as pool:
        pending: deque[tuple[TensorInfo, Future | None]] = deque()
        for info in order:
            pending.append((info, pool.submit(read_rows, info) if roles[info.name] != "copy" else None))
            # Hand out the first tensor once the next matrix's read is under way (copies need no read).
            while pending and (pending[0][1] is None or any(f is not None for _, f in list(pending)[1:])):
                first, future = pending.popleft()
                yield first, future.result() if future is not None else None
        for first, future in pending:
            yield first, future.result() if future is not None else None


def process_linear(info: TensorInfo, weight: torch.Tensor, role: str, settings: Settings, device: torch.device) -> dict:
    """Q (and A, B with their errors for a LoftQ target) of one linear weight, on ``device``."""
    w = weight.to(device, DTYPES[info.dtype])  # an LLM.int8 base reads as fp32: back to the model's dtype
    if role == "quant":
        return {"q": quantize_4bit(w, settings.spec.blocksize, settings.quant_type, settings.double_quant)}
    try:
        result = loftq_matrix(
            w,
            rank=settings.rank,
            scaling=settings.scaling,
            iters=settings.iters,
            quant_type=settings.quant_type,
            blocksize=settings.spec.blocksize,
            double_quant=settings.double_quant,
            svd=settings.svd,
        )
    except torch.linalg.LinAlgError as e:
        raise ConvertError(f"{info.path}: tensor '{info.name}': SVD failed ({e}); is the weight finite?") from None
    return {
        "q": result.quantized,
        "A": result.A,
        "B": result.B,
        "error": result.error,
        "quant_error": result.quant_error,
    }


def copy_tensor(writer: ShardWriter, info: TensorInfo) -> None:
    """An untouched tensor: file to file, or from the mapped ``.bin`` tensor."""
    if info.mapped is None:
        writer.copy(info.name, info)
    else:
        writer.write(info.name, read_rows(info))


def write_4bit(writer: ShardWriter, name: str, q: Quantized4bit, spec: bnb.QuantSpec) -> None:
    """Write an already quantized weight into the tensors ``bnb.serialized_tensors`` planned for it.

    (``convert.execute.quantize_sink.StreamingQuantizer`` quantizes rows itself; LoftQ's Q comes from its own last
    residual, so it is written as computed.)"""
    writer.write(name, q.packed.cpu())
    writer.write(name + ".absmax", q.absmax.cpu())
    writer.write(name + ".quant_map", quant.code_for(spec.method))
    if q.nested_absmax is not None:
        writer.write(name + ".nested_absmax", q.nested_absmax.cpu())
        writer.write(name + ".nested_quant_map", quant.DYNAMIC_CODE)
    blob = bnb.quant_state_blob(q.shape, DTYPE_NAMES[q.dtype], spec, q.offset)
    writer.write(name + bnb.BLOB + spec.method, torch.frombuffer(bytearray(blob), dtype=torch.uint8))
