"""ONNX export: prefill + decode graphs and manifest.json from the reference model (see exporter.py)."""


def require_export_dependencies() -> None:
    """onnx and onnxscript (torch.onnx.export's dynamo exporter) or a MissingDependencyError naming the extra."""
    from ..errors import lazy_import

    for module in ("onnx", "onnxscript"):
        lazy_import(module, extra="onnx", why="exporting to ONNX")
