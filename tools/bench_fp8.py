"""Benchmark the streamed FP8 conversions on the GPU machine: an 8B-shaped block-scaled FP8 base (DeepSeek-V3's
format: e4m3 weights, 128x128 fp32 ``weight_scale_inv``) to bf16 with `convert merge` (no adapter), that bf16
output back to FP8 (`--quantize fp8`), against the `cp` floor and DeepSeek's reference conversion, in one run.

    python tools/bench_fp8.py [--shape 8b|1b] [--workdir /tmp/bench-fp8] [--device cuda|cpu]
                              [--results tools/results/bench_fp8.md] [--also-to $OUT/bench.md]

The base is Llama-shaped (``bench_gpu_merge.SHAPES``: 8b is hidden 4096, 32 layers, intermediate 14336, vocab
128256): random bf16 weights generated on the GPU, the 7 projections of each layer quantized there by the project's
FP8 kernel (``convert.kernels.fp8``, transformers' ``Fp8Quantize`` arithmetic), embeddings, norms and lm_head kept
bf16 (as DeepSeek-V3 and Qwen3-FP8 ship them), written in 5 GB shards with the project's writer, under the
``quantization_config`` DeepSeek-V3 ships. DeepSeek's reference (``inference/fp8_cast_bf16.py`` of
DeepSeek-V3): for each shard, ``safetensors.torch.load_file(device="cuda")``, every weight with a
``weight_scale_inv`` dequantized on the GPU by its Triton ``weight_dequant`` (here the project's Triton
dequantization, the same ``x * s`` in fp32 stored as bf16, since DeepSeek's repository is not a package), then
``save_file`` of the shard and the index without the scales. Each run is timed as a whole process plus a final
`sync` on a dropped page cache, with its own peak RSS (``bench_gpu_merge.timed``); the outputs of both bf16
conversions are compared tensor by tensor (they must be equal), and the FP8 round trip's bytes against the base's.
Ours run as users run them, the `convert` command line (its read-ahead and start-up warming are the command
line's), after an untimed warm-up on a one-layer model; bf16 -> fp8 runs twice, the model's first `--quantize`
(which builds its definition) and a second one (cached), and is also given in units of a `cp` of its bf16 input.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_gpu_merge import (  # noqa: E402
    SHAPES,
    base_tensors,
    cached_bytes,
    disk_line,
    drop_caches,
    row,
    stage_lines,
    timed,
    write_configs,
)

from formats import fp8  # noqa: E402
from formats.writer import PlannedTensor, ShardWriter  # noqa: E402

SPEC = fp8.FP8Spec()  # 128x128 blocks, fp32 inverse scales: --quantize fp8


def to_bf16(base: Path, out: Path, device: str) -> list[str]:
    """The streamed fp8 -> bf16 conversion, as a user runs it: `convert merge` without an adapter."""
    cli = [sys.executable, "-m", "convert.cli"]
    return [*cli, "merge", "--base", str(base), "--out", str(out), "--dtype", "bf16", "--device", device]


def to_fp8(base: Path, out: Path, device: str) -> list[str]:
    """The streamed bf16 -> fp8 conversion (128x128 block scales): `convert quantize --quantize fp8`."""
    cli = [sys.executable, "-m", "convert.cli"]
    return [*cli, "quantize", "--base", str(base), "--quantize", "fp8", "--out", str(out), "--device", device]


# DeepSeek-V3 inference/fp8_cast_bf16.py, with the project's Triton dequantization standing in for its weight_dequant.
DEEPSEEK = """
import json, os, shutil, sys
from glob import glob
import torch
from safetensors.torch import load_file, save_file
from convert.kernels.fp8_triton import dequantize

fp8_path, bf16_path = sys.argv[1], sys.argv[2]
torch.set_default_dtype(torch.bfloat16)
os.makedirs(bf16_path, exist_ok=True)
with open(os.path.join(fp8_path, "model.safetensors.index.json")) as f:
    model_index = json.load(f)
weight_map = model_index["weight_map"]
loaded_files = {}
fp8_weight_names = []

def get_tensor(tensor_name):
    file_name = weight_map[tensor_name]
    if file_name not in loaded_files:
        loaded_files[file_name] = load_file(os.path.join(fp8_path, file_name), device="cuda")
    return loaded_files[file_name][tensor_name]

for safetensor_file in sorted(glob(os.path.join(fp8_path, "*.safetensors"))):
    file_name = os.path.basename(safetensor_file)
    current_state_dict = load_file(safetensor_file, device="cuda")
    loaded_files[file_name] = current_state_dict
    new_state_dict = {}
    for weight_name, weight in current_state_dict.items():
        if weight_name.endswith("_scale_inv"):
            continue
        elif weight.element_size() == 1:  # FP8 weight
            scale_inv = get_tensor(f"{weight_name}_scale_inv")
            fp8_weight_names.append(weight_name)
            new_state_dict[weight_name] = dequantize(weight, scale_inv, (128, 128), 0, torch.bfloat16)
        else:
            new_state_dict[weight_name] = weight
    save_file(new_state_dict, os.path.join(bf16_path, file_name))
    if len(loaded_files) > 2:  # memory management: keep only the 2 most recently used files
        oldest_file = next(iter(loaded_files))
        del loaded_files[oldest_file]
        torch.cuda.empty_cache()

for weight_name in fp8_weight_names:
    weight_map.pop(f"{weight_name}_scale_inv", None)
with open(os.path.join(bf16_path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
config = json.load(open(os.path.join(fp8_path, "config.json")))
config.pop("quantization_config", None)
json.dump(config, open(os.path.join(bf16_path, "config.json"), "w"), indent=2)
"""


def quantized(name: str, shape: tuple[int, ...]) -> bool:
    """The projections: what DeepSeek-V3's and Qwen3-FP8's checkpoints hold FP8 (not embeddings, norms, lm_head)."""
    return name.endswith("_proj.weight")


def build(base: Path, shape: str) -> None:
    """The FP8 base, generated and quantized on the GPU; kept between runs (rebuilt when its config is missing)."""
    if (base / "config.json").exists():
        return
    from convert.kernels import fp8 as kernel

    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    tensors = base_tensors(shape)
    planned = [
        p
        for name, s in tensors.items()
        for p in (
            fp8.serialized_tensors(name, s, "BF16", SPEC) if quantized(name, s) else [PlannedTensor(name, "BF16", s)]
        )
    ]
    writer = ShardWriter(base, planned, 5 * 10**9 if shape == "8b" else 10**9)  # sharded, with an index, as shipped
    gen = torch.Generator("cuda").manual_seed(0)
    for name, s in tensors.items():
        t = torch.randn(s, generator=gen, device="cuda").mul_(1.0 if "norm" in name else 0.02).to(torch.bfloat16)
        if quantized(name, s):
            q, inv = kernel.quantize(t, SPEC.block)
            writer.write(name, q.cpu().view(torch.uint8))
            writer.write(fp8.scale_name(name), inv.cpu())
        else:
            writer.write(name, t.cpu())
    writer.finish()
    write_configs(base, base, shape)  # bench_gpu_merge's LlamaConfig; its NF4 quantization_config is replaced here
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = fp8.quantization_config(SPEC, ["lm_head"])
    (base / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


TO_BF16 = "convert merge, fp8 -> bf16 (no adapter)"
DEEPSEEK_LABEL = "DeepSeek fp8_cast_bf16 (shard by shard on the GPU)"
TO_FP8 = "convert quantize --quantize fp8, bf16 -> fp8 (the model's first)"
TO_FP8_AGAIN = "convert quantize --quantize fp8, bf16 -> fp8 again (its definition cached)"


def sample(shape: str) -> list[str]:
    """The tensors compared: two projections of the first, middle and last layers, then embeddings and lm_head."""
    layers = SHAPES[shape][1]
    names = [f"model.layers.{i}.{p}" for i in (0, layers // 2, layers - 1)
             for p in ("self_attn.k_proj.weight", "mlp.down_proj.weight")]  # fmt: skip
    return [*names, "model.embed_tokens.weight", "lm_head.weight"]


def warm_up(args: argparse.Namespace, report) -> None:
    """Both conversions once, untimed, on a one-layer FP8 model of the same widths: what a user's second command
    finds (Triton's kernels compiled, convert's start-up profile written). A model's definition is cached per
    model, so the 8B model's first `--quantize fp8` still builds it; the table times that one and the next."""
    started = time.perf_counter()
    base, bf16, back = (args.workdir / f"warmup-{k}" for k in ("fp8", "bf16", "back"))
    build(base, f"{args.shape}-warmup")
    for cmd in (to_bf16(base, bf16, args.device), to_fp8(bf16, back, args.device)):
        subprocess.run([*cmd, "-q"], check=True, cwd=ROOT)
    for path in (base, bf16, back):
        shutil.rmtree(path)
    report(f"<!-- warm-up: both conversions on a one-layer model, untimed ({time.perf_counter() - started:.0f} s) -->")


def tensors_of(path: Path) -> dict[str, Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        return {k: path / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    return {k: path / "model.safetensors" for k in _keys(path / "model.safetensors")}


def _keys(file: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(file, "pt") as f:
        return list(f.keys())


def load(path: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(tensors_of(path)[name], "pt") as f:
        return f.get_tensor(name)


def compare(ours: Path, reference: Path, names: list[str]) -> str:
    """Whether the sampled tensors of two checkpoints are bitwise equal (and the name sets match)."""
    if tensors_of(ours).keys() != tensors_of(reference).keys():
        return "different tensor names"
    different = [
        n for n in names if not torch.equal(load(ours, n).view(torch.uint8), load(reference, n).view(torch.uint8))
    ]
    return "equal" if not different else f"{len(different)} of {len(names)} differ ({different[0]}, ...)"


def round_trip(base: Path, back: Path, names: list[str]) -> str:
    """How much of the FP8 base the bf16 -> FP8 round trip gives back byte for byte (it need not: the bf16
    rounding of q * s and a new amax change some codes)."""
    same = total = 0
    for name in names:
        a, b = load(base, name).view(torch.uint8), load(back, name).view(torch.uint8)
        same, total = same + int((a == b).sum()), total + a.numel()
    return f"{100 * same / total:.2f}% of the FP8 codes of {len(names)} sampled weights identical"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="8b")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-fp8"))
    parser.add_argument("--device", default="cuda", help="convert merge --device (the reference always uses cuda)")
    parser.add_argument("--results", type=Path, default=ROOT / "tools" / "results" / "bench_fp8.md")
    parser.add_argument("--also-to", type=Path, help="a second copy of the results, appended line by line")
    args = parser.parse_args()

    def report(line: str = "") -> None:
        print(line, flush=True)
        for path in filter(None, (args.results, args.also_to)):
            with open(path, "a") as f:
                f.write(line + "\n")

    report(f"## {datetime.datetime.now():%Y-%m-%d %H:%M}, {platform.node()}: {torch.cuda.get_device_name()}, "
           f"{os.cpu_count()} cores, convert --device {args.device}")  # fmt: skip
    report()
    base, work = args.workdir / "base-fp8", args.workdir
    started = time.perf_counter()
    build(base, args.shape)
    size_gb = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e9
    report(f"Llama-{args.shape}-shaped FP8 base (128x128 blocks), {size_gb:.1f} GB; built in "
           f"{time.perf_counter() - started:.0f} s")  # fmt: skip
    before, dropped = cached_bytes(), drop_caches()
    report(f"page cache dropped before each run: {'yes' if dropped else 'NO (not permitted)'} (Cached "
           f"{before / 1e9:.1f} GB before, {cached_bytes() / 1e9:.1f} GB after)")  # fmt: skip
    report()
    report("| run | wall s (process + sync) | of which sync s | peak RSS GB | read from disk GB | vs cp |")
    report("|---|---|---|---|---|---|")
    warm_up(args, report)
    cp = timed(["cp", "-r", str(base), str(work / "cp")], work / "cp")
    shutil.rmtree(work / "cp")
    cp_s = cp.total_s
    report(row("cp -r + sync of the FP8 base (I/O floor)", cp, cp_s).rsplit("|", 3)[0] + "|")
    bf16, ref, back = work / "bf16", work / "ref", work / "fp8"
    walls = {}

    def run(label: str, cmd: list[str], out: Path) -> None:
        t = timed(cmd, out)
        walls[label] = t.total_s
        report(row(label, t, cp_s).rsplit("|", 3)[0] + "|")
        summary = [line for line in t.output.splitlines() if "peak RSS" in line]
        for line in [*stage_lines(t.output), *summary[-1:], disk_line(t)]:
            report(f"<!-- {line} -->")

    run(TO_BF16, to_bf16(base, bf16, args.device), bf16)
    run(DEEPSEEK_LABEL, [sys.executable, "-c", DEEPSEEK, str(base), str(ref)], ref)
    equal = compare(bf16, ref, sample(args.shape))
    shutil.rmtree(ref)  # the disk holds the base, the bf16 model, a cp of it and the fp8 copy, not five models
    cp16 = timed(["cp", "-r", str(bf16), str(work / "cp")], work / "cp")  # the unit of the way back
    shutil.rmtree(work / "cp")
    walls["cp_bf16_s"] = cp16.total_s
    report(row("cp -r + sync of the bf16 model (I/O floor of bf16 -> fp8)", cp16, cp_s).rsplit("|", 3)[0] + "|")
    run(TO_FP8, to_fp8(bf16, back, args.device), back)
    shutil.rmtree(back)
    run(TO_FP8_AGAIN, to_fp8(bf16, back, args.device), back)
    report()
    report(f"- fp8 -> bf16, ours against DeepSeek's: {equal} (sampled tensors)")
    report(f"- fp8 -> bf16 -> fp8: {round_trip(base, back, sample(args.shape)[:-2])}")
    ours, deepseek = walls[TO_BF16], walls[DEEPSEEK_LABEL]
    report(f"- fp8 -> bf16: ours {ours:.1f} s = {ours / cp_s:.2f}x cp, DeepSeek's {deepseek:.1f} s = "
           f"{deepseek / cp_s:.2f}x cp; targets: wall <= 1.3x cp ({1.3 * cp_s:.1f} s), peak RSS < 2 GB")  # fmt: skip
    for label in (TO_FP8, TO_FP8_AGAIN):
        wall = walls[label]
        report(f"- {label}: {wall:.1f} s = {wall / cp_s:.2f}x cp of the FP8 base, "
               f"{wall / walls['cp_bf16_s']:.2f}x cp of its bf16 input")  # fmt: skip
    report("- " + json.dumps({"cp_s": cp_s, **walls}))
    report()


if __name__ == "__main__":
    main()
