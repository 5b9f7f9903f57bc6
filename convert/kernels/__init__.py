"""Quantization kernels: tensors and bits only (no checkpoint layouts; those live in ``formats/``).

``quant`` is the device-agnostic API (pure torch on CPU, Triton on CUDA), bit-identical to bitsandbytes.
"""
