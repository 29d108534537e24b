"""LARS (You et al., https://arxiv.org/abs/1708.03888), the optimizer of MAE's linear probing.

As the MAE paper uses it (appendix A.3, following MoCo v3): SGD with momentum where each weight
matrix's update is scaled by trust_coefficient x ||w|| / ||update|| (the update including weight
decay); 1-d parameters (biases, norm weights) are neither decayed nor scaled. Written here rather
than borrowed because timm's `Lars` only adapts when weight decay is non-zero unless told to, and
then also adapts the biases, which is not what the paper ran.

Inside DeepSpeed the optimizer never sees the parameters' shapes: ZeRO (and the bf16 optimizer)
hand it one flat fp32 slice per parameter group, and with several ranks each holds only a part of
it. So (1) `lars_param_groups` puts every parameter in its own group with an explicit
`lars_adapt` flag instead of testing `ndim`, and (2) the two squared norms are summed over the
ranks (one small all-reduce per adapted group) before the trust ratio. Where every rank holds the
whole parameter instead of a slice, the sums are world x the local ones on both sides of the
ratio, which leaves it unchanged: the same code is right for replicated and partitioned states.
"""

from __future__ import annotations

import torch

from mae_scale.distributed import all_reduce_sum


def lars_param_groups(model: torch.nn.Module, weight_decay: float = 0.0) -> list[dict]:
    """One group per trainable parameter: matrices adapted (and decayed), 1-d parameters plain."""
    groups = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            adapt = param.ndim > 1
            groups.append({"params": [param], "lars_adapt": adapt, "weight_decay": weight_decay if adapt else 0.0,
                           "lr_scale": 1.0})
    return groups


class LARS(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient,
                        lars_adapt=None)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            adapt = group["lars_adapt"]
            for p in group["params"]:
                adapted = adapt if adapt is not None else p.ndim > 1  # matrices only: 1-d ones plain SGD
                if p.grad is None and not adapted:
                    continue
                update = p.grad if p.grad is not None else torch.zeros_like(p)  # every rank joins the all-reduce
                if adapted:
                    update = update.add(p, alpha=group["weight_decay"])
                    squares = all_reduce_sum(torch.stack([p.float().pow(2).sum(),
                                                                update.float().pow(2).sum()]))
                    param_norm, update_norm = squares.sqrt()
                    trust = torch.where((param_norm > 0) & (update_norm > 0),
                                        group["trust_coefficient"] * param_norm / update_norm,
                                        torch.ones_like(param_norm))
                    update = update.mul(trust.to(update.dtype))
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-group["lr"])
        return loss
