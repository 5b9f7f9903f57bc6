"""The GPU pipeline: device lists and their shares (on any machine), and merges on CUDA equal to PEFT's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from convert import ConvertError, merge
from convert.devices import parse_devices
from convert.execute.gpu import assign, on_gpu
from convert.plan.build import build_plan
from formats.adapter import open_adapter
from formats.checkpoint import open_checkpoint
from tests.helpers import DTYPES, load_output, make_base, make_dora_adapter, peft_model, ulp_distance


def tiny_plan(tmp_path: Path):
    base = make_base(tmp_path / "base", "llama")
    adapter = make_dora_adapter(tmp_path / "adapter", base, r=4, lora_alpha=8, target_modules="all-linear")
    return build_plan(open_checkpoint(base), open_adapter(adapter))


def test_assign_balances_bytes_and_keeps_plan_order(tmp_path) -> None:
    plan = tiny_plan(tmp_path)
    adapted = [t for t in plan.tensors if on_gpu(t)]
    assert len(adapted) == 14  # 7 linear layers x 2
    shares = assign(adapted, 3)
    assert sorted(t.name for s in shares for t in s) == sorted(t.name for t in adapted)
    order = [t.name for t in adapted]
    loads = [sum(t.shape[0] * t.shape[1] for t in s) for s in shares]
    for share in shares:
        assert [t.name for t in share] == [n for n in order if n in {t.name for t in share}]
    largest = max(t.shape[0] * t.shape[1] for t in adapted)
    assert max(loads) - min(loads) <= largest
    assert assign(adapted, 1) == [adapted]
    assert [len(s) for s in assign(adapted[:1], 2)] == [1, 0]


def test_device_lists_without_cuda(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert parse_devices("cuda") == [torch.device("cuda", 0)]
    assert parse_devices("cuda:1") == [torch.device("cuda", 1)]
    assert parse_devices("cuda:0,cuda:1,cuda:0") == [torch.device("cuda", i) for i in (0, 1, 0)]
    assert parse_devices("cuda:all") == [torch.device("cuda", 0), torch.device("cuda", 1)]
    with pytest.raises(ConvertError, match="cuda:2 does not exist"):
        parse_devices("cuda:0,cuda:2")
    with pytest.raises(ConvertError, match="expected auto, cpu, cuda"):
        parse_devices("cuda:0,cpu")
    with pytest.raises(ConvertError, match="computes on one device"):
        parse_devices("cuda:0,cuda:1", several=False)
    assert parse_devices("auto") == [torch.device("cuda", 0)]
    assert parse_devices("cpu") == [torch.device("cpu")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_device_list_without_cuda_is_refused(tiny_llama, tmp_path) -> None:
    base, adapter = tiny_llama
    with pytest.raises(ConvertError, match="CUDA is not available"):
        merge(base, adapter, tmp_path / "out", device="cuda:0,cuda:1")
    assert not (tmp_path / "out").exists()


def assert_matches_peft(out: Path, base: Path, adapter: Path, dtype: str) -> None:
    merged_ref = peft_model(base, adapter, DTYPES[dtype]).merge_and_unload().state_dict()
    for name, tensor in load_output(out).items():
        ref = merged_ref[name]
        assert tensor.dtype == ref.dtype and tensor.shape == ref.shape, name
        if dtype == "fp32":  # the tile GEMM and the norm sum in another order than the CPU's
            torch.testing.assert_close(tensor, ref, rtol=1e-6, atol=1e-7, msg=name)
        else:
            assert ulp_distance(tensor, ref) <= 1, name


GPU_CASES = {
    "llama-bf16": ("llama", "bf16", dict(r=8, lora_alpha=16, target_modules="all-linear")),
    "llama-fp32-rslora": ("llama", "fp32", dict(r=4, lora_alpha=6, use_rslora=True, target_modules="all-linear")),
    "embedding-fp16": ("llama", "fp16", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "o_proj"])),
    "gpt2-conv1d": ("gpt2", "fp32", dict(r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn", "c_fc"])),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES)
def test_cuda_dora_matches_peft(case, tmp_path) -> None:
    arch, dtype, kwargs = GPU_CASES[case]
    base = make_base(tmp_path / "base", arch, dtype)
    adapter = make_dora_adapter(tmp_path / "adapter", base, **kwargs)
    result = merge(base, adapter, tmp_path / "out", device="cuda")
    assert result.merged > 0
    assert_matches_peft(tmp_path / "out", base, adapter, dtype)


@pytest.mark.gpu
def test_cuda_same_gpu_twice_and_small_chunks_equal_one_pipeline(tmp_path) -> None:
    """Two pipelines on one GPU (the multi-GPU path), and row chunks cycling through the slots, change no bit."""
    base = make_base(tmp_path / "base", "llama", "bf16")
    adapter = make_dora_adapter(tmp_path / "adapter", base, r=8, lora_alpha=16, target_modules="all-linear")
    merge(base, adapter, tmp_path / "one", device="cuda:0")
    merge(base, adapter, tmp_path / "two", device="cuda:0,cuda:0")
    merge(base, adapter, tmp_path / "chunked", device="cuda:all", chunk_size=4 * 48 * 8)
    one = load_output(tmp_path / "one")
    for other in ("two", "chunked"):
        out = load_output(tmp_path / other)
        assert out.keys() == one.keys() and all(torch.equal(one[k], out[k]) for k in one), other
    assert_matches_peft(tmp_path / "one", base, adapter, "bf16")


@pytest.mark.gpu
def test_cuda_cast_and_dtype_change(tmp_path) -> None:
    """--dtype fp32 from a bf16 base: the kernel writes the wider dtype after its input; casts run on the CPU."""
    base = make_base(tmp_path / "base", "llama", "bf16")
    adapter = make_dora_adapter(tmp_path / "adapter", base, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    merge(base, adapter, tmp_path / "gpu", device="cuda", dtype="fp32")
    merge(base, adapter, tmp_path / "cpu", device="cpu", dtype="fp32")
    gpu, cpu = load_output(tmp_path / "gpu"), load_output(tmp_path / "cpu")
    for name in cpu:
        assert gpu[name].dtype == torch.float32
        torch.testing.assert_close(gpu[name], cpu[name], rtol=1e-6, atol=1e-7, msg=name)


def test_gpu_jobs_are_16_row_multiples_and_prefetch_follows_them(tmp_path, monkeypatch) -> None:
    import os

    from convert.execute import gpu as gpu_pipeline

    plan = tiny_plan(tmp_path)
    adapted = [t for t in plan.tensors if on_gpu(t)]
    jobs = gpu_pipeline.gpu_jobs(adapted, 20 * 48)  # 20 rows of 48 -> 16-row chunks
    jobs = [job.work for job in jobs if job.layout is None]
    for t in adapted:
        bounds = [(j.start, j.stop) for j in jobs if j.out is t]
        assert bounds[0][0] == 0 and bounds[-1][1] == t.shape[0]
        assert all(b - a == 16 for a, b in bounds[:-1])
        assert all(b == c for (_, b), (c, _) in zip(bounds, bounds[1:], strict=False))
    calls = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: calls.append((offset, length)))
    monkeypatch.setattr(gpu_pipeline, "available_memory", lambda: 1 << 30)
    gpu_pipeline.prefetch(jobs).join()
    expected = [(j.out.source.offset + j.start * j.out.source.row_bytes, (j.stop - j.start) * j.out.source.row_bytes)
                for j in jobs]  # fmt: skip
    assert calls == expected


@pytest.mark.parametrize("kind", ["bf16", "nf4-dq", "int8", "fp8"])
def test_the_gpu_readers_slots_decode_to_the_rows_the_cpu_reads(kind, tmp_path) -> None:
    """The GPU pipeline's host side on any machine: what each job's reader puts in its slot (16-bit rows, 4-bit
    codes and absmax, FP8 values and scales, or rows its reader dequantized: LLM.int8 in fp32), viewed as the
    compute stage views it, is the rows ``decode.read_rows`` gives the CPU workers, in chunks that start inside
    quantization blocks."""
    from convert.execute import gpu
    from convert.execute.decode import read_rows
    from convert.kernels.merge_triton import Packed4bit, dequantize_reference
    from tests.helpers import SIZES64, fp8_checkpoint, make_adapter, make_base64, quantize_with_transformers

    base16 = make_base64(tmp_path / "base16")
    base = {
        "bf16": lambda: base16,
        "fp8": lambda: fp8_checkpoint(base16, tmp_path / "fp8", split_scales=True),
    }.get(kind, lambda: quantize_with_transformers(base16, tmp_path / kind, kind))()
    adapter = make_adapter(tmp_path / "adapter", base16, r=4, lora_alpha=8, target_modules="all-linear")
    plan = build_plan(open_checkpoint(base), open_adapter(adapter))
    adapted = [t for t in plan.tensors if gpu.on_gpu(t)]
    assert len(adapted) == 14 and SIZES64["hidden_size"] == 64
    jobs = gpu.gpu_jobs(adapted, 48 * 64)  # 48-row chunks: starts inside 32-row FP8 blocks
    assert any(job.work.start % 32 for job in jobs)
    for job in jobs:
        host = torch.zeros(job.sizes[0], dtype=torch.uint8)
        gpu.read_input(job, host)
        base = gpu.device_rows(job, host[: job.input_bytes], torch.device("cpu"))
        rows = dequantize_reference(base) if isinstance(base, Packed4bit) else base
        expected = read_rows(job.work.out.source, job.work.start, job.work.stop)
        assert rows.dtype == expected.dtype and torch.equal(rows, expected), (kind, job.work)
        # without a delta (a plain conversion), the compute stage's rows are the CPU's, cast as the CPU casts them
        result = torch.empty(expected.shape, dtype=DTYPES["bf16"])
        assert torch.equal(gpu.transformed(job, base, result, None), expected.to(result.dtype)), (kind, job.work)
