"""Write opset_generated.h, the C++ view of the op registry (mambadeploy/opset.py) that the ORT kernels read: per op its
name and version, a signature string per input and output, its attributes with their defaults, and its inputs' symbolic
shapes with a `Dims` struct of the dims they bind. The C++ op classes (ops_cpu*.cc, ops_cuda*.cc, through ops.h
`RegistryOp` and `CheckShapes`) take names, counts, dtypes, attribute defaults and shape checks from it, so a change to
an entry reaches the library at the next build, and a test fails while the committed header is stale.

    python -m mambadeploy.plugins.ort.gen_opset            # rewrite the header
    python -m mambadeploy.plugins.ort.gen_opset --check    # exit 1 when the committed header differs
"""

from __future__ import annotations

import sys
import textwrap
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


def _comment(entry: opset.OpEntry) -> list[str]:
    """// Op(input (dims), ...) -> (output (dims), ...), wrapped at 120 columns."""
    def part(n):
        return f"{n} ({', '.join(entry.shapes[n])})"

    text = f"{entry.name}({', '.join(map(part, entry.inputs))}) -> ({', '.join(map(part, entry.outputs))})"
    return ["// " + line for line in textwrap.wrap(text, 117, subsequent_indent="  ", break_on_hyphens=False)]


def _strings(items) -> str:
    return "{" + ", ".join(f'"{x}"' for x in items) + "}"


def _shapes(entry: opset.OpEntry) -> list[str]:
    """The inputs' symbolic shapes (space-separated dims, parsed by ops.h CheckShapes) and the Dims they bind."""
    dims = entry.dim_names()
    return [
        f"  static constexpr const char* kInputNames[] = {_strings(entry.inputs)};",
        f"  static constexpr const char* kInputShapes[] = {_strings(' '.join(entry.shapes[n]) for n in entry.inputs)};",
        f"  static constexpr const char* kDimNames[] = {_strings(dims)};",
        f"  static constexpr size_t kNumDims = {len(dims)};",
        f"  struct Dims {{ int64_t {', '.join(dims)}; }};",
        f"  static Dims Named(const int64_t* v) {{ return {{{', '.join(f'v[{i}]' for i in range(len(dims)))}}}; }}",
    ]


def render() -> str:
    lines = [
        "// GENERATED from mambadeploy/opset.py by `python -m mambadeploy.plugins.ort.gen_opset`: do not edit by hand.",
        "// One struct per registry op: name, version, signature strings (one letter per input/output: T = the model",
        "// dtype, F = float32, I = int64; a lower-case letter marks an optional input), attributes with defaults, and",
        "// each input's symbolic shape (a dim: a name, 2F = twice F, *rows = any leading dims) with the Dims they",
        "// bind.",
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
            *_comment(entry),
            f"struct {entry.name} {{",
            f'  static constexpr const char* kName = "{entry.name}";',
            f"  static constexpr int kVersion = {entry.version};",
            f'  static constexpr const char* kInputs = "{ins}";',
            f'  static constexpr const char* kOutputs = "{outs}";',
            f"  static constexpr size_t kNumInputs = {len(ins)}, kNumOutputs = {len(outs)};",
            *[_attribute(name, kind, default) for name, (kind, default) in entry.attributes.items()],
            *_shapes(entry),
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
