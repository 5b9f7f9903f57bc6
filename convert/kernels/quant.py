"""NF4/FP4 and LLM.int8 quantization, bit-identical to bitsandbytes 0.50.

bitsandbytes rounds differently on CPU and on CUDA, so "identical to bitsandbytes" means identical to bitsandbytes
*on the same device*. The two rules differ in ties and edge cases (FP4 on bf16/fp16 data hits exact ties often):

- ``"cpu"`` (``bitsandbytes.backends.default`` and its C++ kernels): 4-bit is ``x * (1 / absmax)`` with ``absmax``
  clamped to 1e-38 (the last, partial block divides instead), ``clamp(-1, 1)``, then the nearest code by fp32
  midpoints (ties go down); NaN propagates into absmax; an all-zero partial block stores absmax 1e-38. The nested
  8-bit code of double quant goes through a 65536-bin lookup table; int8 is ``round(x * (127 * (1 / absmax)))``.
- ``"cuda"`` (``csrc/kernels.cu``, built with ``--use_fast_math``): ``x * rcp.approx(absmax)`` with NaN left out
  of absmax, then the ``dQuantizeNF4`` / ``dQuantizeFP4`` decision trees (their fp32 literals, strict ``>``);
  0 * inf = NaN makes an all-zero block code 0; FP4's "-0" dequantizes to -0.0; the nested code is dQuantize's
  binary search; int8 rounds ``x * (127 * rcp.approx(absmax))`` half to even, a zero row to 0.

CUDA tensors run the Triton kernels of ``quant_triton`` (the CUDA rule, checked byte for byte against
bitsandbytes' CUDA kernels on the GPU machine); CPU tensors the torch code below (the CPU rule). The torch code also
implements the CUDA rule (``rule="cuda"``) with IEEE reciprocals, as the oracle of the Triton kernels under
``TRITON_INTERPRET=1``; the hardware's ``rcp.approx`` cannot be reproduced on a CPU. Everything here is O(n) memory:
codes are found by comparing with midpoints (``torch.bucketize``), never through (..., 16) distance tables.

Known differences kept on purpose: bitsandbytes' CPU ``dequantize_4bit`` kernel scrambles rows that are not whole
blocks (e.g. a (48, 96) weight at blocksize 64) and its CPU kernels disagree among themselves on the sign of FP4's
zero; here the dequantization is always the flat, consistent one (the tests pin both). Denormal inputs (bf16 below
1.2e-38) are not flushed to zero as ``--use_fast_math`` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

from formats.bnb_names import BLOCKSIZES, NESTED_BLOCKSIZE, QUANT_TYPES

FLT_MAX = torch.finfo(torch.float32).max

NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)  # fmt: skip
# sign bit 0b1000, then 3 bits of a tiny float scaled so that 0b011 is 1.0 (bitsandbytes' get_4bit_type("fp4"))
_FP4_MAGNITUDES = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0]
FP4_CODE = torch.tensor([m / 12.0 for m in _FP4_MAGNITUDES] + [-m / 12.0 for m in _FP4_MAGNITUDES], dtype=torch.float32)
FP4_CODE[8] = 0.0  # get_4bit_type's "-0" is +0.0, as bitsandbytes' torch and AVX-512 dequantization give it ...
FP4_CODE_SIGNED = FP4_CODE.clone()
FP4_CODE_SIGNED[8] = -0.0  # ... while its CUDA kernel (and its scalar C++ one) multiply 0 by the sign: -0.0


def _dynamic_map(max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' ``create_dynamic_map(signed=True)``: the 8-bit code of double quantization."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    for i in range(max_exponent_bits):
        items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = ((bounds[:-1] + bounds[1:]) / 2.0) * (10 ** (-(max_exponent_bits - 1) + i))
        data += means.tolist() + (-means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


DYNAMIC_CODE = _dynamic_map()

# Rule "cpu": bitsandbytes' default backend buckets by fp32 midpoints of the sorted code. FP4's sorted order puts
# +0.0 (0b0000) before -0.0 (0b1000), so tiny positive values get the code of -0.0 there.
_CPU_ORDER = {
    "nf4": torch.arange(16, dtype=torch.uint8),
    "fp4": torch.tensor([11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3], dtype=torch.uint8),
}
_CPU_BOUNDS = {
    name: (code[order.long()][:-1] + code[order.long()][1:]) / 2
    for name, code, order in (("nf4", NF4_CODE, _CPU_ORDER["nf4"]), ("fp4", FP4_CODE, _CPU_ORDER["fp4"]))
}


# Rule "cuda": the thresholds of dQuantizeNF4 / dQuantizeFP4 in csrc/kernels.cu. They are C float literals, which
# nvcc rounds straight from decimal to fp32; several sit within 1e-16 of a midpoint between two floats, where going
# through a Python float (double) first rounds the other way, so they are converted exactly here.
def _c_float_literal(literal: str) -> float:
    """The fp32 value (as a Python float) a C compiler gives ``<literal>f``: nearest to the decimal, ties to even."""
    exact = Fraction(literal)
    guess = torch.tensor(float(exact), dtype=torch.float32)
    candidates = [
        torch.nextafter(guess, torch.tensor(-math.inf)),
        guess,
        torch.nextafter(guess, torch.tensor(math.inf)),
    ]
    return float(min(candidates, key=lambda c: (abs(Fraction(float(c)) - exact), c.view(torch.int32).item() & 1)))


NF4_CUDA_THRESHOLDS = tuple(
    _c_float_literal(t)
    for t in (
        "-0.8480964004993439", "-0.6106329262256622", "-0.4599952697753906", "-0.33967943489551544",
        "-0.23460740596055984", "-0.13791173323988914", "-0.045525018125772476", "0.03979014977812767",
        "0.1202552504837513", "0.2035212516784668", "0.2920137718319893", "0.3893125355243683",
        "0.5016634166240692", "0.6427869200706482", "0.8614784181118011",
    )
)  # fmt: skip
_FP4_LITERALS = ("0.00260417", "0.0859375", "0.20833333", "0.29166667", "0.4166667", "0.583333", "0.8333333")
FP4_CUDA_THRESHOLDS = tuple(_c_float_literal(t) for t in _FP4_LITERALS)  # on |x|; the sign bit is x < 0
FP4_CUDA_CODES = (0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011)  # the code of each |x| bucket


@dataclass
class Quantized4bit:
    """One tensor in bitsandbytes' 4-bit format (what ``quantize_4bit`` returns plus its ``QuantState``)."""

    packed: torch.Tensor  # uint8 ((n + 1) // 2, 1): two codes a byte, the first element in the high nibble
    absmax: torch.Tensor  # float32 (ceil(n / blocksize),); uint8 when double-quantized
    blocksize: int
    quant_type: str  # "nf4" | "fp4"
    shape: tuple[int, ...]
    dtype: torch.dtype
    nested_absmax: torch.Tensor | None = None  # float32 (ceil(n_blocks / 256),) with double quant
    # absmax mean subtracted before double quant: a 0-d tensor on the device when quantized on CUDA (reading it
    # back would stall the stream: ``float(q.offset)`` where a number is needed), a float otherwise
    offset: float | torch.Tensor | None = None


def code_for(quant_type: str) -> torch.Tensor:
    """The 16 values a 4-bit code stands for (times the block's absmax)."""
    check_4bit_args(64, quant_type)
    return NF4_CODE if quant_type == "nf4" else FP4_CODE


def check_4bit_args(blocksize: int, quant_type: str) -> None:
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"4-bit blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def _rule(x: torch.Tensor) -> str:
    return "cuda" if x.is_cuda else "cpu"


# ---------------------------------------------------------------------------------------------- 4-bit blocks


def quantize_blocks_4bit(
    x: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 flat, absmax fp32) of ``x`` flattened; chunks of a multiple of blocksize concatenate exactly."""
    check_4bit_args(blocksize, quant_type)
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"4-bit quantization takes float32/bfloat16/float16, got {x.dtype}")
    if x.is_cuda:
        from convert.kernels import quant_triton

        return quant_triton.quantize_4bit(x.reshape(-1), blocksize, quant_type)
    return quantize_blocks_4bit_torch(x, blocksize, quant_type, rule="cpu")


def quantize_blocks_4bit_torch(
    x: torch.Tensor, blocksize: int, quant_type: str, rule: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch implementation of ``quantize_blocks_4bit`` under bitsandbytes' CPU or CUDA rounding rule."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    tail = flat[full:].view(1, -1)
    if rule == "cpu":
        absmax = blocks.abs().amax(dim=1)
        scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp_(-1, 1).view(-1)
        if tail.numel():
            tail_absmax = tail.abs().amax(dim=1).clamp(min=1e-38)
            absmax = torch.cat([absmax, tail_absmax])
            scaled = torch.cat([scaled, (tail / tail_absmax).clamp_(-1, 1).view(-1)])
        codes = _bucket_cpu(scaled, quant_type)
    else:
        absmax = _absmax_cuda(blocks, padded=False)
        scaled = (blocks * (1.0 / absmax).unsqueeze(1)).view(-1)
        if tail.numel():
            tail_absmax = _absmax_cuda(tail, padded=True)
            absmax = torch.cat([absmax, tail_absmax])
            scaled = torch.cat([scaled, (tail * (1.0 / tail_absmax)).view(-1)])
        codes = _bucket_cuda(scaled, quant_type)
    if n % 2:  # the odd last element's partner is a padding 0 scaled like its block (NaN if absmax is 0 on CUDA)
        pad = torch.zeros(1) * ((1.0 / absmax[-1:]) if rule == "cuda" else 1.0)
        codes = torch.cat([codes, _bucket_cpu(pad, quant_type) if rule == "cpu" else _bucket_cuda(pad, quant_type)])
    return (codes[0::2] << 4) | codes[1::2], absmax


def _absmax_cuda(blocks: torch.Tensor, padded: bool) -> torch.Tensor:
    """kQuantizeBlockwise's absmax: fmaxf from -FLT_MAX ignores NaN; a partial block's padding zeros take part."""
    absmax = torch.where(blocks.isnan(), -FLT_MAX, blocks.abs()).amax(dim=1)
    return absmax.clamp(min=0.0) if padded else absmax


def _bucket_cpu(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    index = torch.bucketize(scaled, _CPU_BOUNDS[quant_type], out_int32=True)
    codes = _CPU_ORDER[quant_type][index] if quant_type == "fp4" else index.to(torch.uint8)
    return codes


def _bucket_cuda(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """dQuantizeNF4 / dQuantizeFP4: the number of thresholds strictly below x; NaN falls through to code 0."""
    if quant_type == "nf4":
        thresholds = torch.tensor(NF4_CUDA_THRESHOLDS, dtype=torch.float32)
        codes = torch.bucketize(scaled, thresholds, out_int32=True).to(torch.uint8)
    else:
        thresholds = torch.tensor(FP4_CUDA_THRESHOLDS, dtype=torch.float32)
        bucket = torch.bucketize(scaled.abs(), thresholds, out_int32=True)
        codes = torch.tensor(FP4_CUDA_CODES, dtype=torch.uint8)[bucket] | ((scaled < 0).to(torch.uint8) << 3)
    return codes.masked_fill_(scaled.isnan(), 0)


def dequantize_blocks_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    shape: tuple[int, ...] | torch.Size,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``code[q] * absmax`` in fp32, rounded once to ``dtype`` (what bitsandbytes does on every device)."""
    check_4bit_args(blocksize, quant_type)
    n = math.prod(shape)
    if packed.is_cuda:
        from convert.kernels import quant_triton

        flat = packed.view(torch.uint8).reshape(-1)
        return quant_triton.dequantize_4bit(flat, absmax.float(), blocksize, quant_type, n, dtype).view(shape)
    return dequantize_blocks_4bit_torch(packed, absmax, blocksize, quant_type, shape, dtype)


def dequantize_blocks_4bit_torch(packed, absmax, blocksize, quant_type, shape, dtype, rule="cpu") -> torch.Tensor:
    """The torch implementation of ``dequantize_blocks_4bit`` under bitsandbytes' CPU or CUDA rule."""
    n = math.prod(shape)
    packed = packed.view(torch.uint8).reshape(-1)
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=1).view(-1)[:n]
    code = FP4_CODE_SIGNED if rule == "cuda" and quant_type == "fp4" else code_for(quant_type)
    values = code.to(packed.device)[codes.long()]
    full = n - n % blocksize
    out = torch.empty(n, dtype=dtype, device=packed.device)
    out[:full] = (values[:full].view(-1, blocksize) * absmax[: full // blocksize].float().unsqueeze(1)).view(-1)
    if full < n:
        out[full:] = values[full:] * absmax[full // blocksize].float()
    return out.view(shape)


# --------------------------------------------------------------------------------------------- double quant


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """bitsandbytes' ``compress_statistics``: (uint8 absmax, nested absmax fp32, offset).

    ``absmax - mean`` is quantized in blocks of 256 with the 8-bit dynamic code. The mean is torch's on the tensor's
    device, as in bitsandbytes, so the offset's last bit follows that device's summation order.
    """
    absmax = absmax.float()
    if absmax.is_cuda:
        from convert.kernels import quant_triton

        q, nested_absmax, mean = quant_triton.double_quantize(absmax)
        return q, nested_absmax, float(mean)
    return double_quantize_torch(absmax, rule="cpu")


def double_quantize_torch(absmax: torch.Tensor, rule: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, float]:
    """``double_quantize`` in torch, under bitsandbytes' CPU rule or (the oracle of the Triton kernel) its CUDA one.
    Both leave NaN out of the nested absmax; on CUDA an all-NaN block keeps fmaxf's start, -FLT_MAX."""
    offset = absmax.mean()
    centred = absmax - offset
    n = centred.numel()
    blocks = torch.nn.functional.pad(centred, (0, -n % NESTED_BLOCKSIZE)).view(-1, NESTED_BLOCKSIZE)
    nan_as = 0.0 if rule == "cpu" else -FLT_MAX
    nested_absmax = torch.where(blocks.isnan(), nan_as, blocks.abs()).amax(dim=1)
    scaled = (blocks * (1.0 / nested_absmax).unsqueeze(1)).view(-1)
    if rule == "cpu":
        q = _dynamic_cpu(scaled, (nested_absmax == 0).repeat_interleave(NESTED_BLOCKSIZE))
    else:
        q = _dynamic_cuda(scaled)
    return q[:n], nested_absmax, float(offset)


def _dynamic_cpu(scaled: torch.Tensor, zero_block: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' CPU 8-bit quantizer (quantize_cpu_impl): a 65536-bin table of [-1, 1], each bin holding the code
    nearest its left edge; a value goes to bin ``trunc((x + 1) * 0.5 * 65535 + 0.5)``; all-zero blocks are code 0."""
    index = (((scaled.clamp(-1, 1) + 1.0) * 0.5) * 65535 + 0.5).nan_to_num_(0.0).long()
    return _dynamic_cpu_table().to(scaled.device)[index].masked_fill_(zero_block, 0)


def _dynamic_cpu_table() -> torch.Tensor:
    global _DYNAMIC_CPU_TABLE
    if _DYNAMIC_CPU_TABLE is None:
        midpoints = 0.5 * (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:])
        edges = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535
        _DYNAMIC_CPU_TABLE = torch.bucketize(edges, midpoints).to(torch.uint8)
    return _DYNAMIC_CPU_TABLE


_DYNAMIC_CPU_TABLE: torch.Tensor | None = None


def _dynamic_cuda(scaled: torch.Tensor) -> torch.Tensor:
    """dQuantize<0> of csrc/kernels.cu, step by step: a 7-step binary search from pivot 127, then the fp32 midpoint
    ``(neighbour + code[pivot]) * 0.5`` decides between the pivot and the neighbour on x's side."""
    code = DYNAMIC_CODE.to(scaled.device)
    pivot = torch.full_like(scaled, 127, dtype=torch.long)
    lower_pivot, upper_pivot = torch.zeros_like(pivot), torch.full_like(pivot, 255)
    lower, upper = torch.full_like(scaled, -1.0), torch.full_like(scaled, 1.0)
    val = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        right = scaled > val
        lower_pivot, lower = torch.where(right, pivot, lower_pivot), torch.where(right, val, lower)
        upper_pivot, upper = torch.where(right, upper_pivot, pivot), torch.where(right, upper, val)
        pivot = pivot + torch.where(right, step, -step)
        val = code[pivot]
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    right = scaled > val
    q = torch.where(
        right,
        torch.where(scaled > (upper + val) * 0.5, upper_pivot, pivot),
        torch.where(scaled < (lower + val) * 0.5, lower_pivot, pivot),
    )
    return q.to(torch.uint8)


def undo_double_quant(
    qabsmax: torch.Tensor, nested_absmax: torch.Tensor, offset: float | torch.Tensor, code: torch.Tensor | None = None
) -> torch.Tensor:
    """fp32 absmax back from double quant: ``code[q] * nested_absmax + offset`` (bitsandbytes' order of ops).

    ``code`` is the checkpoint's ``nested_quant_map``; by default ``DYNAMIC_CODE``, what bitsandbytes records.
    """
    code = (DYNAMIC_CODE if code is None else code).to(device=qabsmax.device, dtype=torch.float32)
    n = qabsmax.numel()
    values = code[qabsmax.reshape(-1).long()]
    values = torch.nn.functional.pad(values, (0, -n % NESTED_BLOCKSIZE)).view(-1, NESTED_BLOCKSIZE)
    absmax = (values * nested_absmax.float().unsqueeze(1)).view(-1)[:n]
    return absmax + torch.as_tensor(offset, dtype=torch.float32, device=absmax.device)


# ------------------------------------------------------------------------------------------- whole tensors


def quantize_4bit(
    x: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = False
) -> Quantized4bit:
    """``bitsandbytes.functional.quantize_4bit(x, blocksize, compress_statistics=double_quant, quant_type)``."""
    packed, absmax = quantize_blocks_4bit(x, blocksize, quant_type)
    q = Quantized4bit(packed.view(-1, 1), absmax, blocksize, quant_type, tuple(x.shape), x.dtype)
    if double_quant and absmax.is_cuda:  # the offset stays on the device: no host sync in the middle of a stream
        from convert.kernels import quant_triton

        q.absmax, q.nested_absmax, q.offset = quant_triton.double_quantize(absmax)
    elif double_quant:
        q.absmax, q.nested_absmax, q.offset = double_quantize(absmax)
    return q


def dequantize_4bit(q: Quantized4bit, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``bitsandbytes.functional.dequantize_4bit`` of the same state (``dtype`` defaults to the original's)."""
    check_4bit_args(q.blocksize, q.quant_type)
    if q.packed.is_cuda:  # the kernel undoes double quant on the fly
        from convert.kernels import quant_triton

        nested = None if q.nested_absmax is None else (q.nested_absmax, q.offset)
        flat = q.packed.view(-1) if q.packed.dtype == torch.uint8 else q.packed.view(torch.uint8).view(-1)
        n = math.prod(q.shape)
        return quant_triton.dequantize_4bit(
            flat, q.absmax, q.blocksize, q.quant_type, n, dtype or q.dtype, nested
        ).view(q.shape)
    absmax = q.absmax
    if q.nested_absmax is not None:
        absmax = undo_double_quant(absmax, q.nested_absmax, q.offset)
    return dequantize_blocks_4bit(q.packed, absmax.float(), q.blocksize, q.quant_type, q.shape, dtype or q.dtype)


# -------------------------------------------------------------------------------------------------- int8


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8 rows: ``round(x * (127 / absmax_row))`` and SCB = absmax_row (``int8_vectorwise_quant``).

    bitsandbytes (and transformers' ``Int8Params``) quantize the float16 copy of a weight: pass ``x.half()`` for
    the same bytes as a checkpoint transformers writes.
    """
    if x.is_cuda:
        from convert.kernels import quant_triton

        return quant_triton.quantize_int8(x)
    return quantize_int8_torch(x, rule="cpu")


def quantize_int8_torch(x: torch.Tensor, rule: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_int8`` in torch. Rule "cpu" is bitsandbytes' default backend verbatim; rule "cuda" is its
    kInt8VectorQuant: NaN left out of the absmax, and NaN products (a zero row) quantize to 0."""
    rows = x.reshape(-1, x.shape[-1]).float()
    if rule == "cpu":
        scb = x.reshape(rows.shape).abs().amax(dim=1).float()
        return torch.round(rows * (127.0 / scb.unsqueeze(1))).to(torch.int8).view(x.shape), scb
    scb = torch.where(rows.isnan(), 0.0, rows.abs()).amax(dim=1)
    product = rows * (torch.full_like(scb, 127.0) / scb).unsqueeze(1)  # a true division (``127.0 / t`` is 127 * 1/t)
    return torch.round(product).nan_to_num_(0.0).to(torch.int8).view(x.shape), scb


def dequantize_int8(q: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``int8_vectorwise_dequant`` (what transformers uses): ``q * SCB * (1/127 as fp32)``, then ``dtype``."""
    if q.is_cuda:
        from convert.kernels import quant_triton

        return quant_triton.dequantize_int8(q, scb, dtype)
    rows = q.reshape(-1, q.shape[-1])
    return (rows * scb.float().view(-1, 1) * 7.874015718698502e-3).to(dtype).view(q.shape)
