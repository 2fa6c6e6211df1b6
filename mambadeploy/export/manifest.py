"""manifest.json of an export directory: everything a runtime needs to drive the graphs without the Python model.

Schema (format_version 1):
  format, format_version, mambadeploy_version, exporter {torch, onnx, onnxscript, method}
  family, config (ModelConfig.to_dict()), dtype ("float32" | "float16" | "bfloat16"), opset, ops ("portable" | "custom" |
  "contrib"), domains {domain: version} used by the graphs beyond the standard one, contrib {op: what it replaces}
  checkpoint {source, config_sha256}
  limits {max_batch, max_length (prompt + generated tokens, null = unbounded)}
  state [{name, shape (with "batch"), dtype}] in graph order (names from models/state.py)
  graphs {prefill|decode: {file, sha256, bytes, external_data [{file, bytes}], inputs [...], outputs [...]}}
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import MambaDeployError, check_fields, read_json
from ..paths import contained

FORMAT = "mambadeploy-export"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ManifestError(MambaDeployError):
    """An export directory whose manifest is missing, malformed, or does not match its graphs."""


@dataclass
class TensorSpec:
    name: str
    shape: list  # ints and symbol names ("batch", "length")
    dtype: str


@dataclass
class GraphEntry:
    file: str
    sha256: str
    bytes: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    external_data: list[dict] = field(default_factory=list)  # [{file, bytes}]

    def __post_init__(self):
        self.inputs = [t if isinstance(t, TensorSpec) else TensorSpec(**t) for t in self.inputs]
        self.outputs = [t if isinstance(t, TensorSpec) else TensorSpec(**t) for t in self.outputs]


@dataclass
class Manifest:
    family: str
    config: dict
    dtype: str
    opset: int
    ops: str
    state: list[TensorSpec]
    graphs: dict[str, GraphEntry]
    limits: dict
    checkpoint: dict
    exporter: dict
    mambadeploy_version: str
    domains: dict = field(default_factory=dict)
    contrib: dict = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        self.state = [t if isinstance(t, TensorSpec) else TensorSpec(**t) for t in self.state]
        self.graphs = {k: g if isinstance(g, GraphEntry) else GraphEntry(**g) for k, g in self.graphs.items()}

    @property
    def model_config(self):
        from ..models.config import ModelConfig

        return ModelConfig.from_dict(self.config)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def write(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST
        path.write_text(self.to_json())
        return path

    @classmethod
    def read(cls, directory) -> Manifest:
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.is_file():
            raise ManifestError(f"{directory}: no {MANIFEST}: not an export directory (make one with `mambadeploy export`)")
        data = read_json(path, ManifestError)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ManifestError(f"{path}: not a mambadeploy export manifest (format {data.get('format')!r})")
        if data.get("format_version", 0) > FORMAT_VERSION:
            raise ManifestError(f"{path}: format_version {data['format_version']} is newer than this mambadeploy "
                                f"({FORMAT_VERSION}); upgrade mambadeploy or re-export")
        check_fields(cls, data, f"{path} (malformed manifest)", ManifestError)
        return cls(**data)

    def check_files(self, directory, hash_graphs: bool = True) -> None:
        """Every graph and external-data file present with its recorded size (and the graph's sha256)."""
        directory = Path(directory)
        for name, g in self.graphs.items():
            path = contained(directory, g.file, f"{name} graph file")
            if not path.is_file():
                raise ManifestError(f"{directory}: graph file {g.file} ({name}) listed in the manifest is missing")
            if path.stat().st_size != g.bytes or (hash_graphs and sha256_file(path) != g.sha256):
                raise ManifestError(f"{path}: does not match the manifest (size or sha256 differs): the directory was "
                                    "modified after export; re-export it")
            for ext in g.external_data:
                p = contained(directory, ext["file"], f"external data file of {g.file}")
                if not p.is_file() or p.stat().st_size != ext["bytes"]:
                    raise ManifestError(f"{p}: external data of {g.file} missing or of the wrong size "
                                        f"(manifest: {ext['bytes']} bytes)")
            check_external_locations(directory, path)


def check_external_locations(directory: Path, graph_path: Path) -> None:
    """Every initializer's external-data location inside the graph itself must stay inside the directory too (ONNX
    Runtime would follow it; recent versions refuse it themselves, older ones did not)."""
    import onnx

    proto = onnx.load(str(graph_path), load_external_data=False)
    for t in proto.graph.initializer:
        for kv in t.external_data:
            if kv.key == "location":
                contained(directory, kv.value, f"external data of {graph_path.name} (tensor {t.name})")


def sha256_file(path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def config_sha256(config_dict: dict) -> str:
    return hashlib.sha256(json.dumps(config_dict, sort_keys=True).encode()).hexdigest()
