"""The one table of dtype names (a floor module: imports only torch and errors).

Two spellings exist: the short one users type and validate prints (fp32, fp16, bf16), and the one manifests, ONNX and
the engines' type tables are keyed by (float32, float16, bfloat16, plus the integer types of ids and lengths). Every
other module converts through here; backend-specific type maps (ONNX TensorProto, ORT, TensorRT, Triton) are keyed by
the manifest spelling.
"""

from __future__ import annotations

import torch

from .errors import CheckpointError

# manifest spelling -> torch dtype
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "int32": torch.int32, "int64": torch.int64}
# floating compute dtypes: torch dtype -> (short, manifest) spelling
FLOAT_NAMES = {torch.float32: ("fp32", "float32"), torch.float16: ("fp16", "float16"),
               torch.bfloat16: ("bf16", "bfloat16")}
# every accepted spelling of a compute dtype -> torch dtype
COMPUTE_DTYPES = {name: dtype for dtype, names in FLOAT_NAMES.items() for name in names}


def parse_dtype(dtype) -> torch.dtype:
    """A compute dtype from a torch dtype or either spelling ('fp16' / 'float16')."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in COMPUTE_DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; use one of fp32, fp16, bf16")
    return COMPUTE_DTYPES[dtype]


def short_name(dtype) -> str:
    """fp32 / fp16 / bf16 of a compute dtype (torch dtype or either spelling)."""
    return FLOAT_NAMES[parse_dtype(dtype)][0]


def manifest_name(dtype: torch.dtype) -> str:
    """float32 / float16 / bfloat16 / int64 ...: the spelling manifests and graph type tables use."""
    if dtype in FLOAT_NAMES:
        return FLOAT_NAMES[dtype][1]
    for name, d in TORCH_DTYPES.items():
        if d == dtype:
            return name
    raise CheckpointError(f"no manifest name for dtype {dtype}")
