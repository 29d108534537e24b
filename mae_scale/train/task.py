"""What a task gives the loop: a model, an optimizer, data, the loss of a micro-batch, and what
happens around the steps (pictures for pretraining; evaluation for fine-tuning and probing).

A task is composed into `Loop`, not derived from it: `bind(loop)` gives it the loop (config, ranks,
run directory, engine once built, step counters, tracker), and the loop calls the methods below in
this order: prepare_data, build_model, flops_per_image, build_optimizer, loader, started; then per
run before_train, per step micro_loss / after_step, per epoch after_epoch, before every save
before_save, at the end after_train and result_extra.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Task(Protocol):
    step_logs: tuple[str, ...]  # its own JSON-lines logs keyed by step (cut back with metrics.jsonl on resume)

    def bind(self, loop) -> None: ...

    def prepare_data(self) -> None: ...

    def build_model(self, fresh: bool) -> torch.nn.Module:
        """`fresh`: no checkpoint to resume, so `model.init` applies."""

    def flops_per_image(self, model: torch.nn.Module) -> float: ...

    def build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer: ...

    def loader(self, epoch: int, skip_batches: int): ...

    def tracked_params(self, params: dict) -> dict:
        """The flattened config as MLflow params: what this run reads."""

    def started(self) -> None:
        """The engine is built and the checkpoint (if any) loaded."""

    def micro_loss(self, micro: int, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def before_train(self) -> None: ...

    def after_step(self, micro_batches: list[dict]) -> None: ...

    def after_epoch(self, micro_batches: list[dict]) -> None: ...

    def after_train(self, micro_batches) -> None: ...

    def before_save(self) -> None: ...

    def result_extra(self) -> dict: ...

    def summary(self, result: dict) -> list[str]:
        """The task's own lines of the report printed at the end."""
