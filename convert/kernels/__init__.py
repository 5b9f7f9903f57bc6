"""Kernels: tensors and bits only (no checkpoint layouts; those live in ``formats/``).

``quant`` is the device-agnostic quantization API (pure torch on CPU, Triton on CUDA), bit-identical to
bitsandbytes; ``merge_triton`` the fused LoRA/DoRA merge, each kernel beside the torch reference it is
tested against; ``launch`` calls a compiled Triton kernel's launcher directly after its first call (Triton's own
per-call binding costs more CPU time than a small matrix's GPU time).
"""
