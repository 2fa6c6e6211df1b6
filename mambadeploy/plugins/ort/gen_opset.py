"""Write opset_generated.h, the C++ view of the op registry (mambadeploy/opset.py) that the ORT kernels read: per op its
name and version, a signature string per input and output, and its attributes with their defaults. The C++ op classes
(ops_cpu*.cc, ops_cuda*.cc, through ops.h `RegistryOp`) take names, counts, dtypes and attribute defaults from it, so a
change to an entry reaches the library at the next build, and a test fails while the committed header is stale.

    python -m mambadeploy.plugins.ort.gen_opset            # rewrite the header
    python -m mambadeploy.plugins.ort.gen_opset --check    # exit 1 when the committed header differs
"""

from __future__ import annotations

import sys
from pathlib import Path

from ... import opset

HEADER = Path(__file__).resolve().parent / "opset_generated.h"
# node dtype class -> signature letter (upper case: required input, lower case: optional input)
LETTERS = {"T": "T", "F32": "F", "I64": "I"}


def signature(entry: opset.OpEntry) -> tuple[str, str]:
    """(inputs, outputs) as letters: T the model dtype, F float32, I int64; an optional input in lower case."""
    ins = "".join(LETTERS[c].lower() if name in entry.optional_inputs else LETTERS[c]
                  for name, c in entry.node_dtypes.items())
    return ins, "".join(LETTERS[c] for c in entry.output_dtypes)


def _attribute(name: str, kind: str, default) -> str:
    if kind == "int":
        return f'  static constexpr IntAttr {name}{{"{name}", {int(default)}}};'
    if kind == "float":
        return f'  static constexpr FloatAttr {name}{{"{name}", {float(default)!r}f}};'
    raise ValueError(f"attribute kind {kind!r} has no C++ form")


def render() -> str:
    lines = [
        "// GENERATED from mambadeploy/opset.py by `python -m mambadeploy.plugins.ort.gen_opset`: do not edit by hand.",
        "// One struct per registry op: name, version, signature strings (one letter per input/output: T = the model",
        "// dtype, F = float32, I = int64; a lower-case letter marks an optional input) and attributes with defaults.",
        "#pragma once",
        "",
        "#include <cstddef>",
        "#include <cstdint>",
        "",
        "namespace mambadeploy_opset {",
        "",
        f'constexpr const char* kDomain = "{opset.DOMAIN}";',
        "",
        "struct IntAttr {",
        "  const char* name;",
        "  int64_t fallback;  // the registry default, used when a node leaves the attribute out",
        "};",
        "struct FloatAttr {",
        "  const char* name;",
        "  float fallback;",
        "};",
    ]
    for entry in opset.REGISTRY.values():
        ins, outs = signature(entry)
        lines += [
            "",
            f"// {entry.name}({', '.join(entry.inputs)}) -> ({', '.join(entry.outputs)})",
            f"struct {entry.name} {{",
            f'  static constexpr const char* kName = "{entry.name}";',
            f"  static constexpr int kVersion = {entry.version};",
            f'  static constexpr const char* kInputs = "{ins}";',
            f'  static constexpr const char* kOutputs = "{outs}";',
            f"  static constexpr size_t kNumInputs = {len(ins)}, kNumOutputs = {len(outs)};",
            *[_attribute(name, kind, default) for name, (kind, default) in entry.attributes.items()],
            "};",
        ]
    lines += ["", "}  // namespace mambadeploy_opset", ""]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if HEADER.read_text() != text:
            print(f"{HEADER} is stale: run python -m mambadeploy.plugins.ort.gen_opset", file=sys.stderr)
            return 1
        return 0
    HEADER.write_text(text)
    print(HEADER)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
