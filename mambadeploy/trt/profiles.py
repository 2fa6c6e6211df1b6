"""Optimization profiles: min/opt/max shapes for every dynamic graph input, computed from the graph's own symbolic dims.

An exported graph names its dynamic dims (ONNX dim_param). Each name plays one role: a batch dim, a length dim (prompt
tokens), or a token count (batch x length, the flattened MoE input). The user gives the maxima (`--max-batch`,
`--max-prompt`) and may give the shapes to tune for (opt); the minimum is always 1 so every smaller request runs on the same
engine. All of it is plain Python, unit-tested without TensorRT; the runner uses `check_within` before each call so an
out-of-profile request fails with the fix instead of a TensorRT error.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import InputError, MambaDeployError

ROLE_OF_SYMBOL = {}
for _name in ("batch", "batch_size", "b", "B"):
    ROLE_OF_SYMBOL[_name] = "batch"
for _name in ("length", "len", "seq", "seq_len", "seqlen", "sequence", "sequence_length", "prompt", "prompt_length", "L"):
    ROLE_OF_SYMBOL[_name] = "length"
for _name in ("tokens", "num_tokens", "T"):
    ROLE_OF_SYMBOL[_name] = "tokens"


@dataclass(frozen=True)
class ProfileLimits:
    max_batch: int
    max_prompt: int
    opt_batch: int
    opt_prompt: int

    def range_of(self, role: str) -> tuple[int, int, int]:
        if role == "batch":
            return 1, self.opt_batch, self.max_batch
        if role == "length":
            return 1, self.opt_prompt, self.max_prompt
        if role == "tokens":
            return 1, self.opt_batch * self.opt_prompt, self.max_batch * self.max_prompt
        raise MambaDeployError(f"unknown profile role {role!r}")

    def as_dict(self) -> dict:
        return asdict(self)


def make_limits(max_batch: int, max_prompt: int, opt_batch: int | None = None, opt_prompt: int | None = None,
                max_seq_len: int | None = None) -> ProfileLimits:
    """Validate the user's numbers. Default opt: half the maximum batch (at least 1) and a quarter of the maximum prompt
    (at least 1) — the middle of the range, so neither end is far from the shapes TensorRT tuned for."""
    if max_batch < 1 or max_prompt < 1:
        raise MambaDeployError(f"--max-batch and --max-prompt must be >= 1 (got {max_batch}, {max_prompt})")
    if max_seq_len is not None and max_prompt > max_seq_len:
        raise MambaDeployError(
            f"--max-prompt {max_prompt} exceeds the model's KV cache length {max_seq_len} (attention layers); use "
            f"--max-prompt {max_seq_len} or less"
        )
    opt_batch = max(1, max_batch // 2) if opt_batch is None else opt_batch
    opt_prompt = max(1, max_prompt // 4) if opt_prompt is None else opt_prompt
    if not 1 <= opt_batch <= max_batch:
        raise MambaDeployError(f"--opt-batch {opt_batch} must lie in [1, --max-batch {max_batch}]")
    if not 1 <= opt_prompt <= max_prompt:
        raise MambaDeployError(f"--opt-prompt {opt_prompt} must lie in [1, --max-prompt {max_prompt}]")
    return ProfileLimits(max_batch, max_prompt, opt_batch, opt_prompt)


def role_of(symbol: str) -> str:
    if symbol not in ROLE_OF_SYMBOL:
        raise MambaDeployError(
            f"graph input dim {symbol!r} is dynamic but not a batch/length/token dim this builder knows "
            f"({', '.join(sorted(ROLE_OF_SYMBOL))}); re-export with standard dim names"
        )
    return ROLE_OF_SYMBOL[symbol]


def input_profile(inputs: dict, limits: ProfileLimits) -> dict:
    """inputs: {name: dims} with ints for static dims and strings for dynamic ones (-1/None = unnamed dynamic, refused).
    Returns {name: (min_shape, opt_shape, max_shape)} for the inputs that have a dynamic dim."""
    profile = {}
    for name, dims in inputs.items():
        if all(isinstance(d, int) and d >= 0 for d in dims):
            continue
        shapes = ([], [], [])
        for d in dims:
            if isinstance(d, int) and d >= 0:
                rng = (d, d, d)
            elif isinstance(d, str) and d:
                rng = limits.range_of(role_of(d))
            else:
                raise MambaDeployError(f"graph input {name!r} has an unnamed dynamic dim {dims}; re-export with named dims")
            for shape, v in zip(shapes, rng):
                shape.append(v)
        profile[name] = tuple(tuple(s) for s in shapes)
    return profile


def check_within(profile: dict, shapes: dict, build_hint: str = "") -> None:
    """Raise InputError naming the input, the dim and the fix when a request's shape is outside the engine's profile."""
    for name, shape in shapes.items():
        if name not in profile:
            continue
        lo, _, hi = profile[name]
        if len(shape) != len(hi):
            raise InputError(f"input {name!r} has rank {len(shape)}, the engine expects rank {len(hi)}")
        for axis, (v, a, b) in enumerate(zip(shape, lo, hi)):
            if not a <= v <= b:
                what = "batch" if axis == 0 else f"dim {axis}"
                raise InputError(
                    f"input {name!r} {what} = {v} is outside the engine's profile [{a}, {b}]; rebuild the engine with a "
                    f"larger limit{(': ' + build_hint) if build_hint else ' (mambadeploy build ... --max-batch/--max-prompt)'}"
                )
