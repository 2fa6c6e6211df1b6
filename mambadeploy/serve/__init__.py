"""Serving on NVIDIA Triton Inference Server: in-flight batching over a pool of recurrent-state slots (batcher, slots),
the Python-backend model that drives it (triton_model), the model repository writer (repo) and the bundled server
launcher (server)."""
