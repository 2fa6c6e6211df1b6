"""mambadeploy: Mamba + MoE language models (BlackMamba, MoE-Mamba, Jamba) from checkpoints to ONNX Runtime and TensorRT,
every artifact checked against a PyTorch reference."""

__version__ = "0.1.0"


def load_model(path_or_preset, dtype="fp32", device="cpu"):
    from .models.checkpoint import load_model as _load

    return _load(path_or_preset, dtype=dtype, device=device)


def save_model(model, directory):
    from .models.checkpoint import save_model as _save

    return _save(model, directory)
