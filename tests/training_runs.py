"""Real training checkpoints, written by the libraries themselves in processes spawned by the tests.

    python -m tests.training_runs fsdp2 RUN_DIR WORLD_SIZE

``fsdp2``: a tiny Llama sharded with FSDP2 (``fully_shard``) over WORLD_SIZE gloo ranks, one
AdamW step, then ``dcp.save({"model": ..., "optim": ...})`` to RUN_DIR/checkpoint (the
accelerate/torchtitan layout) with the model's config.json in RUN_DIR; plus RUN_DIR/columns,
a DCP checkpoint of one tensor sharded on its second dimension (tensor-parallel style).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SIZES = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


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
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, SIZES["vocab_size"], (2, 8), generator=g)
    model(ids, labels=ids).loss.backward()
    optimizer.step()


def fsdp2(rank: int, world: int, run: Path, port: int) -> None:
    import torch.distributed.checkpoint as dcp
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
    dist.destroy_process_group()


KINDS = {"fsdp2": fsdp2}

if __name__ == "__main__":
    kind, run, world = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    mp.spawn(KINDS[kind], args=(world, run, free_port()), nprocs=world)
