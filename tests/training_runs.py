"""Real training checkpoints, written by the libraries themselves in processes spawned by the tests.

    python -m tests.training_runs fsdp2 RUN_DIR WORLD_SIZE

``fsdp2``: a tiny Llama sharded with FSDP2 (``fully_shard``) over WORLD_SIZE gloo ranks, one
AdamW step, then ``dcp.save({"model": ..., "optim": ...})`` to RUN_DIR/checkpoint (the
accelerate/torchtitan layout) with the model's config.json in RUN_DIR; plus RUN_DIR/columns,
a DCP checkpoint of one tensor sharded on its second dimension (tensor-parallel style); plus
RUN_DIR/peft, the same with a PEFT LoRA model.
``zero3``: the same model trained one step with DeepSpeed ZeRO-3 on the CPU, saved with
``engine.save_checkpoint(RUN_DIR, tag="step1")``; ``zero3_peft``: a PEFT LoRA model, likewise.

Also the consolidate tests' shared helpers (``spawn_run`` and the rest below), so that no test
module imports another; the project's own helpers are re-exported from one import.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

from tests.helpers import ROOT, SIZES, subprocess_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_llama():
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SIZES, tie_word_embeddings=False)
    return config, transformers.AutoModelForCausalLM.from_config(config)


def train_step(model, optimizer) -> None:
    """One step; ``model`` may be a DeepSpeed engine (which is its own optimizer and does its own backward)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, SIZES["vocab_size"], (2 if model is not optimizer else 1, 8), generator=g)
    loss = model(ids, labels=ids).loss
    if model is optimizer:
        model.backward(loss)
        model.step()
    else:
        loss.backward()
        optimizer.step()


def fsdp2(rank: int, world: int, run: Path, port: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    config, model = tiny_llama()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_step(model, optimizer)
    dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, checkpoint_id=run / "checkpoint")
    mesh = init_device_mesh("cpu", (world,))
    columns = torch.arange(6 * 4 * world, dtype=torch.float32).view(6, 4 * world) + 0.5
    dcp.save({"w": distribute_tensor(columns, mesh, [Shard(1)])}, checkpoint_id=run / "columns")
    if rank == 0:
        config.save_pretrained(run)
    fsdp2_peft(run / "peft")
    dist.destroy_process_group()


def fsdp2_peft(run: Path) -> None:
    """A PEFT LoRA model (all linear layers) under FSDP2, saved as accelerate saves it: RUN_DIR/checkpoint,
    with the base (RUN_DIR/base), config.json and adapter_config.json beside it."""
    import peft
    from torch.distributed.fsdp import fully_shard

    config, model = tiny_llama()
    if dist.get_rank() == 0:
        model.save_pretrained(run / "base")
    lora = peft.LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    model = peft.get_peft_model(model, lora)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train_step(model, optimizer)
    dcp.save({"model": model.state_dict()}, checkpoint_id=run / "checkpoint")
    if dist.get_rank() == 0:
        config.save_pretrained(run)
        model.peft_config["default"].save_pretrained(run)


def zero3(rank: int, world: int, run: Path, port: int) -> None:
    """DeepSpeed ZeRO-3 on DeepSpeed's CPU accelerator (gloo): bf16 training, two parameter groups (so that
    partitions cross group boundaries), the embedding frozen (saved as frozen fragments, as a PEFT base is)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_SIZE=str(world), DS_ACCELERATOR="cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    config, model = tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in trainable if "layers.0" in n]},
        {"params": [p for n, p in trainable if "layers.0" not in n], "weight_decay": 0.0},
    ]
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    train_step(engine, engine)
    engine.save_checkpoint(run, tag="step1")
    if rank == 0:
        config.save_pretrained(run)


def zero3_peft(rank: int, world: int, run: Path, port: int) -> None:
    """A PEFT LoRA model (q_proj, v_proj; lm_head as modules_to_save) trained with DeepSpeed ZeRO-3 in fp32,
    as transformers' Trainer runs it: the base saved first (RUN_DIR/base), the adapter config beside the run."""
    import peft

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_SIZE=str(world), DS_ACCELERATOR="cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    config, model = tiny_llama()
    if rank == 0:
        model.save_pretrained(run / "base")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
                           init_lora_weights=False)  # fmt: skip
    model = peft.get_peft_model(model, lora)
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
    }
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)
    train_step(engine, engine)
    engine.save_checkpoint(run, tag="step1")
    if rank == 0:
        config.save_pretrained(run)
        model.peft_config["default"].save_pretrained(run)


def spawn_run(kind: str, run: Path, world: int) -> Path:
    """Write a run of ``kind`` with ``world`` processes (``python -m tests.training_runs``)."""
    env = subprocess_env()
    subprocess.run(
        [sys.executable, "-m", "tests.training_runs", kind, str(run), str(world)],
        check=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    return run


def assert_same_logits(out: Path, config_dir: Path, state: dict[str, torch.Tensor]) -> None:
    """The output, loaded by transformers, gives the logits of the model holding the oracle's ``state``."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    oracle = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(config_dir)).eval()
    oracle.load_state_dict(state)
    ids = torch.arange(12).view(2, -1)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, oracle(ids).logits)


def copy_run(run: Path, tmp: Path) -> Path:
    """A copy of a run to damage (the fixtures' runs are shared by a module's tests)."""
    shutil.copytree(run, tmp / "run")
    return tmp / "run"


class Boom:
    """Pickles to a call of ``os.system``: a checkpoint that would run code if unpickled unsafely."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


KINDS = {"fsdp2": fsdp2, "zero3": zero3, "zero3_peft": zero3_peft}

if __name__ == "__main__":
    kind, run, world = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    mp.spawn(KINDS[kind], args=(world, run, free_port()), nprocs=world)
