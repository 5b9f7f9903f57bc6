"""Dtype names as files spell them, torch-free: safetensors' (``BF16``), configs' (``bfloat16``), the CLI's (``bf16``).

The one table of each, so that the command line can offer choices before torch is imported.
"""

# safetensors dtype -> the name transformers' config.json (``dtype`` / ``torch_dtype``) and quant states use
TORCH_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}
FLOAT_DTYPES = frozenset(TORCH_NAMES)
# ``--dtype`` -> safetensors dtype of floating-point output tensors (auto: each keeps the base's)
OUTPUT_DTYPES = {"auto": None, "bf16": "BF16", "fp16": "F16", "fp32": "F32"}
