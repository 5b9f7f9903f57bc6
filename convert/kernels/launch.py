"""Launch a Triton kernel again without Triton's per-call argument binding.

On the GPU machine's CPU, ``kernel[grid](...)`` spends about 34 us per call binding the arguments, building the
specialization key and looking the kernel up, before its C launcher runs (about 7 us). For a 1024x4096 matrix that is
several times the GPU's work, and it is most of what bitsandbytes' ctypes launch is compared against. So the first
call of each specialization goes through Triton (which compiles the kernel or finds it in its cache) and later calls
go straight to that compiled kernel's launcher.

The key must separate every case Triton compiles separately, or a call would run a kernel specialized for other
arguments. It follows Triton's rules: constexpr parameters by value; tensors by dtype and whether their address is
16-byte aligned; ints by whether they are 1, whether they are divisible by 16, and whether they fit 32 bits; floats
are not specialized; plus the launch options and the device. Under ``TRITON_INTERPRET=1`` (the CPU tests) and when
a Triton launch hook is set, every call takes Triton's own path.
"""

from __future__ import annotations

import inspect
import os

import torch
import triton

try:
    from triton import knobs
except ImportError:  # Triton before 3.4 keeps its hooks elsewhere: FastLaunch then always takes Triton's path
    knobs = None


def _launch_hooks() -> tuple[object, object] | None:
    """Triton's launch hooks as its launcher takes them, or None when some are set (profilers need Triton's own
    path, which gives them each launch's metadata). Empty hooks are None, or an empty chain in newer Triton."""
    if knobs is None:
        return None
    hooks = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    return None if any(h is not None and getattr(h, "calls", True) for h in hooks) else hooks


class FastLaunch:
    """``FastLaunch(kernel)(grid, *every_parameter_in_order, **launch_options)``: constexprs are passed
    positionally too, so one tuple of arguments serves both paths."""

    def __init__(self, kernel: triton.JITFunction) -> None:
        self.kernel = kernel
        self.names = list(inspect.signature(kernel.fn).parameters)
        self.direct = os.environ.get("TRITON_INTERPRET") != "1" and hasattr(kernel, "params")
        self.constexpr = [p.is_constexpr for p in kernel.params] if self.direct else []
        self.compiled: dict[tuple, object] = {}

    def __call__(self, grid: tuple[int, ...], *args: object, **options: object) -> None:
        hooks = _launch_hooks() if self.direct else None
        if hooks is None:
            self.kernel[grid](**dict(zip(self.names, args, strict=True)), **options)
            return
        device = torch.cuda.current_device()
        key = [device, *options.items()]
        for arg, constexpr in zip(args, self.constexpr, strict=True):  # inline: this runs on every launch
            if constexpr:
                key.append(arg)
            elif isinstance(arg, torch.Tensor):
                key.append((arg.dtype, arg.data_ptr() % 16 == 0))
            elif isinstance(arg, int) and not isinstance(arg, bool):
                key.append((arg == 1, arg % 16 == 0, -(2**31) <= arg < 2**31))
            else:
                key.append(type(arg))
        key = tuple(key)
        compiled = self.compiled.get(key)
        if compiled is None:
            self.compiled[key] = self.kernel[grid](**dict(zip(self.names, args, strict=True)), **options)
            return
        stream = triton.runtime.driver.active.get_current_stream(device)
        grid = (*grid, 1, 1)
        compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, None, *hooks,
                     *args)  # fmt: skip
