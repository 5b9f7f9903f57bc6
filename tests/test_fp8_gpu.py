"""The FP8 Triton kernels on a real GPU: the same bits as the torch references on the CPU (transformers'
``Fp8Quantize`` / ``Fp8Dequantize`` arithmetic), and as torch running that arithmetic on CUDA.

Skipped without CUDA; run for real on the GPU machine."""

from __future__ import annotations

import pytest
import torch

from convert.kernels import fp8 as F

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the GPU machine)")
SHAPES = [((4096, 4096), (128, 128)), ((576, 7168), (128, 128)), ((1000, 300), (128, 128)), ((72, 100), (32, 32))]


def sample(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(shape[0] + shape[1])
    x = torch.randn(shape, generator=g) * torch.logspace(-4, 2, shape[1])
    x[:3] = 0.0
    return x.to(dtype)


@cuda
@pytest.mark.parametrize("shape,block", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_quantize_on_cuda_equals_the_cpu_reference(shape, block, dtype) -> None:
    w = sample(shape, dtype)
    q, inv = F.quantize(w.cuda(), block)  # the Triton kernel
    ref_q, ref_inv = F.quantize_torch(w, block)
    assert torch.equal(q.cpu().view(torch.uint8), ref_q.view(torch.uint8))
    assert torch.equal(inv.cpu(), ref_inv)
    torch_q, torch_inv = F.quantize_torch(w.cuda(), block)  # torch's own CUDA ops, the same arithmetic
    assert torch.equal(torch_q.cpu().view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(
        torch_inv.cpu(), ref_inv
    )


@cuda
@pytest.mark.parametrize("shape,block", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_dequantize_on_cuda_equals_the_cpu_reference(shape, block, dtype) -> None:
    q, inv = F.quantize_torch(sample(shape, torch.float32), block)
    for first in (0, 5, shape[0] // 2):
        s = inv[first // block[0] :]
        out = F.dequantize(q[first:].cuda(), s.cuda(), block, first, dtype)  # the Triton kernel
        assert torch.equal(out.cpu(), F.dequantize_torch(q[first:], s, block, first, dtype)), first


@cuda
def test_cuda_merge_from_fp8_base_equals_cpu_merge(tmp_path) -> None:
    """merge --device cuda from an FP8 base (the reader dequantizes, the fused kernel adds the delta) equals the CPU
    merge within 1 ulp (a GPU GEMM sums in another order)."""
    from convert import merge
    from tests.helpers import SIZES64, fp8_checkpoint, load_output, make_adapter, make_llama, ulp_distance

    base16 = make_llama(tmp_path / "base16", SIZES64)
    base = fp8_checkpoint(base16, tmp_path / "fp8", split_scales=True)
    adapter = make_adapter(tmp_path / "adapter", base16, r=4, lora_alpha=8, target_modules="all-linear")
    for device in ("cpu", "cuda"):
        merge(base, adapter, tmp_path / device, device=device, dtype="bf16")
    cpu, gpu = load_output(tmp_path / "cpu"), load_output(tmp_path / "cuda")
    assert cpu.keys() == gpu.keys() and all(ulp_distance(gpu[k], v) <= 1 for k, v in cpu.items())


@cuda
def test_cuda_fp8_conversions_equal_the_cpu_ones(tmp_path) -> None:
    """The streamed conversions through the GPU pipeline (the FP8 values and their scales go to the device and
    are dequantized or quantized there) write the same bytes as the CPU workers: fp8 -> bf16, bf16 -> fp8 (block
    and per-tensor scales), and fp8 + adapter -> fp8 (``--quantize same``), in small chunks that start inside
    blocks. With an adapter the GPU's product may sum in another order (1 ulp before quantizing), so there the
    values are compared: nearly all bytes equal, the others one e4m3 step apart."""
    from convert import merge
    from tests.helpers import SIZES64, fp8_checkpoint, load_output, make_adapter, make_llama, tree_digest

    base16 = make_llama(tmp_path / "base16", SIZES64)
    base = fp8_checkpoint(base16, tmp_path / "fp8", split_scales=True)
    adapter = make_adapter(tmp_path / "adapter", base16, r=4, lora_alpha=8, target_modules="all-linear")
    cases = [(base, None, {"dtype": "bf16"}), (base16, None, {"quantize": "fp8"})]
    cases.append((base, adapter, {"quantize": "same"}))
    for i, (source, delta, options) in enumerate(cases):
        for device in ("cpu", "cuda"):
            merge(source, delta, tmp_path / f"{i}-{device}", device=device, chunk_size=4 * 64 * 48, **options)
        if delta is None:
            assert tree_digest(tmp_path / f"{i}-cuda") == tree_digest(tmp_path / f"{i}-cpu"), options
            continue
        cpu, gpu = load_output(tmp_path / f"{i}-cpu"), load_output(tmp_path / f"{i}-cuda")
        assert cpu.keys() == gpu.keys()
        for name, tensor in gpu.items():
            a, b = tensor.view(torch.uint8).int(), cpu[name].view(torch.uint8).int()
            assert tensor.dtype == cpu[name].dtype and (a == b).float().mean() > 0.99, name
            if tensor.dtype == torch.float8_e4m3fn:
                assert (a - b).abs().max() <= 1, name
