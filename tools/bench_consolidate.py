"""Benchmark `consolidate --from deepspeed` against DeepSpeed's `zero_to_fp32.py`, each as a whole process.

    python tools/bench_consolidate.py [--workdir /tmp/bench-consolidate] [--results tools/results/bench_consolidate.md]

Writes a ZeRO-3 checkpoint of a TinyLlama-1.1B-shaped model (hidden 2048, 22 layers,
intermediate 5632, vocab 32000, 32 heads / 4 KV heads) over 4 ranks, in DeepSpeed's
own file layout: per rank `zero_pp_rank_R_mp_rank_00_model_states.pt` (param_shapes,
16-bit placeholders) and `bf16_zero_pp_rank_R_mp_rank_00_optim_states.pt` (the rank's
fp32 flat partition plus Adam's exp_avg/exp_avg_sq of the same size), each a
`torch.save` of the dicts `engine.save_checkpoint` writes (the tests check the reader on
files DeepSpeed itself wrote; a 1.1B ZeRO-3 training run does not fit this 2-core,
23 GB machine). Then times, with the page cache warm and `sync` between runs:
  * `python -m deepspeed.utils.zero_to_fp32 RUN OUT --safe_serialization` (the reference),
  * `consolidate("deepspeed", RUN, OUT)` (this tool; the CLI command is wired by the lead).
Peak RSS is each process's own (GNU time). Both outputs are compared tensor by tensor.
Needs deepspeed and transformers (the test extras).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
from collections import OrderedDict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import bench_merge  # noqa: E402  (its `timed` and page-cache warming)

WORLD = 4
DIMS = dict(hidden=2048, layers=22, inter=5632, vocab=32000, heads=32, kv_heads=4)
OURS = (
    "from convert.commands.consolidate import consolidate; import sys; "
    "consolidate('deepspeed', sys.argv[1], sys.argv[2])"
)


def param_shapes() -> OrderedDict:
    h, i, v = DIMS["hidden"], DIMS["inter"], DIMS["vocab"]
    kv = h // DIMS["heads"] * DIMS["kv_heads"]
    shapes = OrderedDict([("model.embed_tokens.weight", torch.Size([v, h]))])
    for n in range(DIMS["layers"]):
        p = f"model.layers.{n}."
        for name, shape in (
            ("self_attn.q_proj.weight", [h, h]),
            ("self_attn.k_proj.weight", [kv, h]),
            ("self_attn.v_proj.weight", [kv, h]),
            ("self_attn.o_proj.weight", [h, h]),
            ("mlp.gate_proj.weight", [i, h]),
            ("mlp.up_proj.weight", [i, h]),
            ("mlp.down_proj.weight", [h, i]),
            ("input_layernorm.weight", [h]),
            ("post_attention_layernorm.weight", [h]),
        ):
            shapes[p + name] = torch.Size(shape)
    shapes["model.norm.weight"] = torch.Size([h])
    shapes["lm_head.weight"] = torch.Size([v, h])
    return shapes


def build(workdir: Path) -> Path:
    run = workdir / "run"
    tag = run / "global_step1"
    if (run / "latest").exists():
        return run
    tag.mkdir(parents=True, exist_ok=True)
    shapes = param_shapes()
    flat = sum(math.ceil(s.numel() / WORLD) for s in shapes.values())
    for rank in range(WORLD):
        g = torch.Generator().manual_seed(rank)
        module = {name: torch.empty(0, dtype=torch.bfloat16) for name in shapes}
        model_states = {
            "module": module, "buffer_names": [], "optimizer": None, "param_shapes": [shapes],
            "frozen_param_shapes": OrderedDict(), "shared_params": {}, "frozen_param_fragments": OrderedDict(),
            "lr_scheduler": None, "dp_world_size": WORLD, "mp_world_size": 1, "ds_version": "0.19.8",
        }  # fmt: skip
        torch.save(model_states, tag / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
        partition = torch.randn(flat, generator=g)
        adam = {"step": torch.tensor(1.0), "exp_avg": torch.zeros(flat), "exp_avg_sq": torch.zeros(flat)}
        optim = {
            "zero_stage": 3, "loss_scaler": None, "dynamic_loss_scale": False, "overflow": False,
            "partition_count": WORLD, "optimizer_state_dict": {"state": {0: adam}, "param_groups": [{"lr": 1e-4}]},
            "fp32_flat_groups": [partition],
        }  # fmt: skip
        torch.save({"optimizer_state_dict": optim, "ds_version": "0.19.8"},
                   tag / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")  # fmt: skip
        del partition, adam, optim
    import transformers

    transformers.LlamaConfig(
        hidden_size=DIMS["hidden"], num_hidden_layers=DIMS["layers"], intermediate_size=DIMS["inter"],
        vocab_size=DIMS["vocab"], num_attention_heads=DIMS["heads"], num_key_value_heads=DIMS["kv_heads"],
        tie_word_embeddings=False,
    ).save_pretrained(run)  # fmt: skip
    (run / "latest").write_text("global_step1")
    return run


def compare(ours: Path, reference: Path) -> int:
    """Tensors that differ between the two outputs (read one tensor at a time)."""
    from safetensors import safe_open

    def index(d: Path) -> dict[str, Path]:
        return {k: f for f in sorted(d.glob("*.safetensors")) for k in safe_open(f, "pt").keys()}

    a, b = index(ours), index(reference)
    if sorted(a) != sorted(b):
        raise SystemExit(f"different tensor names: {sorted(set(a) ^ set(b))[:5]}")
    differ = 0
    for name in a:
        with safe_open(a[name], "pt") as fa, safe_open(b[name], "pt") as fb:
            differ += not torch.equal(fa.get_tensor(name), fb.get_tensor(name))
    return differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-consolidate"))
    parser.add_argument("--results", type=Path, default=ROOT / "tools" / "results" / "bench_consolidate.md")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each, interleaved; the median is reported")
    args = parser.parse_args()
    run = build(args.workdir)
    tag = run / "global_step1"
    bench_merge.BASE_FILES.extend(sorted(p for p in tag.iterdir() if "model_states" in p.name or "optim" in p.name))
    outs = {"ours": args.workdir / "ours", "reference": args.workdir / "reference"}
    env_cmd = ["env", f"PYTHONPATH={ROOT}"]
    ref_name = "reference: deepspeed zero_to_fp32.py --safe_serialization"
    our_name = "consolidate --from deepspeed"
    runs = {
        ref_name: ([sys.executable, "-m", "deepspeed.utils.zero_to_fp32", str(run), str(outs["reference"]),
                    "--safe_serialization"], outs["reference"]),
        our_name: ([*env_cmd, sys.executable, "-c", OURS, str(run), str(outs["ours"])], outs["ours"]),
    }  # fmt: skip
    samples: dict[str, list[tuple[float, int, str]]] = {name: [] for name in runs}
    for _ in range(args.repeat):
        for name, (cmd, out) in runs.items():
            samples[name].append(bench_merge.timed(cmd, out))
    differ = compare(outs["ours"], outs["reference"])
    wall = {n: statistics.median(s[0] for s in v) for n, v in samples.items()}
    rss = {n: max(s[1] for s in v) for n, v in samples.items()}
    size = sum(f.stat().st_size for f in outs["ours"].glob("*.safetensors"))
    rank_bytes = sum(f.stat().st_size for f in bench_merge.BASE_FILES)
    lines = [
        "# consolidate --from deepspeed vs zero_to_fp32.py",
        "",
        f"{datetime.date.today()}, {platform.node()}: {os.cpu_count()} cores, torch {torch.__version__}, "
        f"median of {args.repeat}, page cache warm.",
        "",
        f"ZeRO-3 checkpoint of a TinyLlama-1.1B-shaped model over {WORLD} ranks ({rank_bytes / 1e9:.1f} GB of rank "
        f"files, fp32 masters + Adam states), written in DeepSpeed's layout by this script; output fp32 safetensors "
        f"({size / 1e9:.2f} GB), 5 GB shards.",
        "",
        "| run | wall s | peak RSS |",
        "|---|---|---|",
        *(f"| {n} | {wall[n]:.1f} | {rss[n] / 1e9:.2f} GB |" for n in runs),
        "",
        f"RSS ratio (ours / reference): {rss[our_name] / rss[ref_name]:.1%} (target <= 15%); "
        f"wall ratio: {wall[our_name] / wall[ref_name]:.2f} (target <= 1).",
        f"Tensors differing between the two outputs: {differ} (bit-exact comparison, tensor by tensor).",
        "",
    ]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
