"""Run under torchrun by test_layer_decay.py: LARS inside a DeepSpeed ZeRO engine (flat, partitioned
fp32 slices) must take the same steps as LARS on the plain parameters."""

import json
import sys

import deepspeed
import torch

from mae_scale.distributed import exit_process, init_distributed, shutdown_distributed
from mae_scale.lars import LARS, lars_param_groups


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.GELU(), torch.nn.Linear(12, 5))


def main(stage: int, out: str) -> None:
    init_distributed()
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))  # the same batch on every rank
    net = model()
    engine, *_ = deepspeed.initialize(
        model=net, optimizer=LARS(lars_param_groups(net, 1e-4), lr=0.5, momentum=0.9),
        config={"train_batch_size": 8 * torch.distributed.get_world_size(), "zero_optimization": {"stage": stage},
                "zero_allow_untested_optimizer": True}, dist_init_required=False)
    reference, sgd = model(), model()
    ref_opt = LARS(lars_param_groups(reference, 1e-4), lr=0.5, momentum=0.9)
    sgd_opt = torch.optim.SGD(sgd.parameters(), lr=0.5, momentum=0.9)
    for _ in range(3):
        loss = engine(x).square().mean()
        engine.backward(loss)
        engine.step()
        for net_, opt in ((reference, ref_opt), (sgd, sgd_opt)):
            opt.zero_grad()
            net_(x).square().mean().backward()
            opt.step()
    got = dict(engine.module.named_parameters())
    result = {
        "max_diff_lars": max((got[n].detach() - p.detach()).abs().max().item() for n, p in reference.named_parameters()),
        "max_diff_sgd": max((got[n].detach() - p.detach()).abs().max().item() for n, p in sgd.named_parameters()),
    }
    if torch.distributed.get_rank() == 0:
        with open(out, "w") as fh:
            json.dump(result, fh)
    shutdown_distributed()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
    exit_process(0)  # as the CLI leaves: no interpreter finalization while gloo threads wind down
