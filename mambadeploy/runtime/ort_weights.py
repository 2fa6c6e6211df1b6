"""One copy of an export's weights for all of its ONNX Runtime sessions.

An ORT runner holds up to three sessions over the same weights (prefill, decode, prefill_state: their initializers
point into one external data file, export/exporter.py). Each session loads its own copy: Jamba-1.5-Mini's 96 GB of bf16
weights would need 288 GB on the device (measured on the H200 with a 24.8 GiB model: 87 GiB after the three sessions
loaded). `SessionOptions.add_initializer` hands a session an initializer that the caller owns; ORT uses it in place
when it already lives where the session plans it (CPU, or the CUDA device: its `initializers_to_share_map`), so the
runner reads each external tensor once into one OrtValue and gives that value to every session whose graph names it
(by file, offset and length: the graphs may name the same bytes differently).

On the CPU the values are the memory-mapped file itself (zero copy); on CUDA one device buffer per tensor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# ONNX element type -> numpy dtype of its raw bytes (bf16 as its 16-bit words: numpy has no bfloat16)
_RAW = {1: np.float32, 10: np.float16, 16: np.uint16, 7: np.int64, 6: np.int32, 9: np.bool_, 3: np.int8, 2: np.uint8,
        11: np.float64}


def external_tensors(graph_path: Path) -> list[tuple[str, tuple, int, tuple]]:
    """[(initializer name, key, ONNX element type, dims)] of a graph's externally stored tensors; key = (file, offset,
    length, type, dims): the same bytes read as the same tensor."""
    import onnx

    out = []
    for t in onnx.load(str(graph_path), load_external_data=False).graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {kv.key: kv.value for kv in t.external_data}
        key = (info["location"], int(info.get("offset", 0)), int(info["length"]), t.data_type, tuple(t.dims))
        out.append((t.name, key, t.data_type, tuple(t.dims)))
    return out


class SharedWeights:
    """The external tensors of an export's graphs as OrtValues on one device, made on first use, kept alive as long
    as this object (the sessions use them in place: they must outlive every session)."""

    def __init__(self, directory: Path, device: str = "cpu", device_id: int = 0):
        self.directory, self.device, self.device_id = Path(directory), device, device_id
        self.values: dict = {}  # (file, offset, length, type, dims) -> OrtValue
        self._maps: dict = {}  # file -> np.memmap

    def add_to(self, opts, graph_path: Path) -> int:
        """add_initializer every external tensor of this graph to the session options; returns how many."""
        entries = external_tensors(graph_path)
        for name, key, onnx_type, dims in entries:
            opts.add_initializer(name, self._value(key, onnx_type, dims))
        return len(entries)

    def bytes(self) -> int:
        return sum(key[2] for key in self.values)

    def _value(self, key, onnx_type, dims):
        if key not in self.values:
            import onnxruntime as ort

            file, offset, length = key[:3]
            if onnx_type not in _RAW:
                raise ValueError(f"external tensor of ONNX type {onnx_type} in {file}: not shared (unknown type)")
            data = self._map(file)[offset:offset + length].view(_RAW[onnx_type]).reshape(dims)
            if self.device == "cpu":
                value = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(data, onnx_type)  # the mapped file, no copy
            else:
                value = ort.OrtValue.ortvalue_from_shape_and_type(list(dims), onnx_type, self.device, self.device_id)
                value.update_inplace(np.ascontiguousarray(data))
            self.values[key] = value
        return self.values[key]

    def _map(self, file: str):
        if file not in self._maps:
            self._maps[file] = np.memmap(self.directory / file, dtype=np.uint8, mode="r")
        return self._maps[file]
