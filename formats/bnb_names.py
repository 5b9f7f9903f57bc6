"""bitsandbytes' names and settings as checkpoints spell them: the one place each is written down.

Plain Python (no torch), so that the command line can offer the choices before anything heavy is imported.
"""

from formats import dtypes

QUANT_TYPES = ("nf4", "fp4")
METHODS = (*QUANT_TYPES, "int8")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' quantize_4bit accepts
NESTED_BLOCKSIZE = 256  # double quantization: 8-bit dynamic code, blocks of 256 absmax values
STORAGE = {"uint8": "U8", "int8": "I8", "float16": "F16", "bfloat16": "BF16", "float32": "F32"}  # quant_storage
TORCH_NAMES = {k: v for k, v in dtypes.TORCH_NAMES.items() if k != "F64"}  # what a 4-bit weight may dequantize to
COMPUTE_DTYPES = ("auto", *TORCH_NAMES.values())
BLOB = ".quant_state.bitsandbytes__"  # + quant type: the packed JSON quant state of a 4-bit weight
SUFFIXES_4BIT = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
# Models whose Linear layers are transformers' Conv1D ((in, out) weights), which bitsandbytes stores transposed.
CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer")
