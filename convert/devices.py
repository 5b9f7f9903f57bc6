"""The one parser of ``--device``: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``cuda:0,cuda:1`` or ``cuda:all``.

Under torchrun each rank computes on one device: the GPU of its local rank among those the option names
(``auto``, ``cuda`` and ``cuda:all``: every GPU of the machine), shared when there are more ranks than GPUs.
"""

from __future__ import annotations

import os

import torch

from formats.errors import ConvertError

EXPECTED = "expected auto, cpu, cuda, cuda:N, a list like cuda:0,cuda:1, or cuda:all"


def parse_devices(spec: str, *, several: bool = True) -> list[torch.device]:
    """The devices a command computes on: one CPU, or one or more GPUs (repeats allowed; ``several=False``
    for commands that use one device). ``auto`` takes the first GPU where there is one; a torchrun rank
    gets its own one."""
    devices = _parse(spec, several)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or devices[0].type != "cuda":
        return devices
    pool = rank_pool(spec)
    return [pool[int(os.environ.get("LOCAL_RANK", "0")) % len(pool)]]


def rank_pool(spec: str) -> list[torch.device]:
    """The devices torchrun's ranks on this machine take theirs from, in local-rank order."""
    devices = _parse(spec, several=True)
    if devices[0].type == "cuda" and spec in ("auto", "cuda", "cuda:all"):
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return devices


def _parse(spec: str, several: bool) -> list[torch.device]:
    if spec == "auto":
        return [torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")]
    names = [n.strip() for n in spec.split(",")]
    if not several and (len(names) > 1 or spec == "cuda:all"):
        raise ConvertError(f"--device {spec!r}: this command computes on one device (auto, cpu, cuda or cuda:N)")
    if spec == "cpu":
        return [torch.device("cpu")]
    if not spec.startswith("cuda"):
        raise ConvertError(f"--device {spec!r}: {EXPECTED}")
    if not torch.cuda.is_available():
        raise ConvertError(f"--device {spec}: CUDA is not available on this machine")
    count = torch.cuda.device_count()
    if spec == "cuda:all":
        return [torch.device("cuda", i) for i in range(count)]
    devices = []
    for name in names:
        try:
            dev = torch.device(name)
        except RuntimeError:
            dev = None
        if dev is None or dev.type != "cuda":
            raise ConvertError(f"--device {spec!r}: {EXPECTED}")
        index = dev.index or 0
        if index >= count:
            raise ConvertError(f"--device {spec}: {name} does not exist ({count} CUDA device(s) here)")
        devices.append(torch.device("cuda", index))
    return devices
