"""Triton kernels, each module beside the `_ref` it is checked against (re-exported from models/ref_ops):

selective_scan, selective_state_update, causal_conv1d (+ causal_conv1d_update), rms_norm (add_rms_norm, rms_norm),
moe_routing (route, route_hidden, moe_align), moe_experts (expert_gather).

Each module exposes its @triton.jit kernel(s) as module-level names and `launch_config(shapes, dtypes) -> dict`, a plain
function of shapes (grid, num_warps, num_stages, constexprs) with no autotune state, so an ahead-of-time compile can
reproduce every launch. Kernel files import only torch and triton (and the reference from models/ref_ops). This package
imports nothing itself: `import mambadeploy.kernels` works without triton installed.
"""
