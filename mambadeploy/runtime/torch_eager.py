"""torch-eager backend: the reference model itself, run as it is."""

from __future__ import annotations

import torch

from .. import __version__
from ..models.model import MambaMoELM
from .base import Runner


class TorchEagerRunner(Runner):
    backend = "torch"

    def __init__(self, model: MambaMoELM):
        self.model = model.eval()
        self.config = model.config

    @torch.no_grad()
    def prefill(self, input_ids, lengths=None):
        input_ids = input_ids.to(self.model.device)
        return self.model.prefill(input_ids, None if lengths is None else lengths.to(self.model.device))

    @torch.no_grad()
    def step(self, token_ids, state):
        return self.model.step(token_ids.to(self.model.device), state)

    def synchronize(self):
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)

    def describe(self):
        d = self.model.device
        return {"backend": self.backend, "device": str(d), "dtype": str(self.model.dtype).replace("torch.", ""),
                "torch": torch.__version__, "mambadeploy": __version__,
                "gpu": torch.cuda.get_device_name(d) if d.type == "cuda" else None}
