"""Exponential moving average of a module's weights (fp32 shadow copy, diffusers' warmup rule).

    decay_t = min(decay, (1 + t) / (10 + t))      # t = number of updates so far
    shadow  = decay_t * shadow + (1 - decay_t) * param

Floating buffers (e.g. norm statistics) are copied, not averaged. The shadow lives on the
module's device; `state_dict()` is plain tensors, so checkpoints save it with safetensors.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


class EMA:
    def __init__(self, module: nn.Module, decay: float = 0.999):
        self.decay = float(decay)
        self.updates = 0
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items()
                       if v.dtype.is_floating_point}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """One averaging step: a single fused lerp over the trained parameters, copies for the rest."""
        d = self.current_decay()
        params = dict(module.named_parameters())
        averaged, sources, copied, values = [], [], [], []
        for name, value in module.state_dict().items():
            if name not in self.shadow:
                continue
            if name in params and params[name].requires_grad:
                averaged.append(self.shadow[name])
                sources.append(value.detach().float())
            else:
                copied.append(self.shadow[name])
                values.append(value.detach().float())
        if averaged:
            torch._foreach_lerp_(averaged, sources, 1.0 - d)
        if copied:
            torch._foreach_copy_(copied, values)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
        for k in self.shadow:
            self.shadow[k].copy_(state[k])
        self.updates = int(updates)

    def copy_to(self, module: nn.Module) -> None:
        """Write the averaged weights into `module` (in its dtypes)."""
        module.load_state_dict({**module.state_dict(), **self.shadow}, strict=True)

    @contextlib.contextmanager
    def applied(self, module: nn.Module) -> Iterator[nn.Module]:
        """Temporarily swap the EMA weights into `module` (for sampling), restoring afterwards."""
        backup = {k: v.detach().clone() for k, v in module.state_dict().items()}
        self.copy_to(module)
        try:
            yield module
        finally:
            module.load_state_dict(backup, strict=True)
