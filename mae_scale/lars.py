"""LARS (You et al., https://arxiv.org/abs/1708.03888), the optimizer of MAE's linear probing.

As the MAE paper uses it (appendix A.3, following MoCo v3): SGD with momentum where each weight
matrix's update is scaled by trust_coefficient x ||w|| / ||update|| (the update including weight
decay); 1-d parameters (biases, norm weights) are neither decayed nor scaled. Written here rather
than borrowed because timm's `Lars` only adapts when weight decay is non-zero unless told to, and
then also adapts the biases, which is not what the paper ran.
"""

from __future__ import annotations

import torch


class LARS(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:  # matrices only: biases and norms are plain SGD with momentum
                    update = update.add(p, alpha=group["weight_decay"])
                    param_norm = torch.linalg.vector_norm(p)
                    update_norm = torch.linalg.vector_norm(update)
                    one = torch.ones_like(param_norm)
                    trust = torch.where(param_norm > 0.0,
                                        torch.where(update_norm > 0, group["trust_coefficient"] * param_norm / update_norm, one),
                                        one)
                    update = update.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-group["lr"])
        return loss
