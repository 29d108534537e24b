"""The training loop inside a DeepSpeed ZeRO engine; it knows no objective and no task.

`Loop.train_step` is one optimizer step (forward/backward over the micro-batches, the finite-loss
guard, the DeepSpeed step); `Loop.train` is the loop (schedule, logging, checkpoint cadence,
resume, signals). What is trained and how (model, optimizer, data, the loss of a micro-batch,
evaluation, pictures) is the task's: `mae_scale.train.task.Task`, composed in, not inherited.

Everything random that a resumed run must reproduce is a pure function of saved counters: the data
order and crops of (seed, epoch, sample position), the draws of a micro-batch of (seed, step, rank,
micro-batch) (`mae_scale.seeding`). Nothing depends on RNG state only rank 0 would save.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import time
from collections import Counter
from typing import Optional

import torch

from mae_scale import faults
from mae_scale.checkpoint import CheckpointManager, install_safe_loader
from mae_scale.config import check_batch_layout, flatten, peak_lr, to_dict
from mae_scale.config_resume import check_resume
from mae_scale.device_feed import DevicePrefetcher
from mae_scale.distributed import DistEnv, all_reduce_sum, any_rank, barrier
from mae_scale.errors import RunInterrupted, RunStopped
from mae_scale.models.compile import compile_blocks
from mae_scale.optim import cosine_lr, deepspeed_config, schedule_summary, set_lr
from mae_scale.runlock import hold_run_dir
from mae_scale.seeding import MicroKey
from mae_scale.speed import memory_peaks, peak_flops, step_speed
from mae_scale.stop_signals import StopSignals
from mae_scale.tracking import Tracker, default_tracking_uri
from mae_scale.train.rundir import ATTEMPTS, CONFIG, LOSS_CURVE, METRICS, RESULT, RunDir
from mae_scale.train.task import Task
from mae_scale.visualize import save_loss_curve

# A ViT's weights stay within about +-100 in every published run; past this the run has diverged
# (a learning rate of 1e30 puts them near 1e28, still finite in bf16) and the next forward overflows.
WEIGHT_LIMIT = 1e6


class NonFiniteLossError(RunStopped):
    """The run diverged: a non-finite loss or gradient norm (the step was not applied), or weights
    past WEIGHT_LIMIT (not saved). The newest checkpoint is untouched."""


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Loop:
    """Builds the engine, checkpointing and tracking around a task's model; owns the loop."""

    def __init__(self, cfg, env: DistEnv, task: Task, accept_config_change: bool = False):
        import deepspeed

        self.cfg, self.env, self.task = cfg, env, task
        self.run_dir = RunDir(cfg.output_dir)
        self.accum = check_batch_layout(cfg, env.world_size)
        self.lock = hold_run_dir(self.run_dir.path, env.is_main)  # one writer per run directory, before any write
        self.ckpt = CheckpointManager(self.run_dir.path, cfg.checkpoint.keep_last, env.is_main)
        self._check_config_change(accept_config_change)
        if env.is_main:
            self.run_dir.save_config(cfg)
        barrier()
        task.bind(self)
        task.prepare_data()

        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        model = task.build_model(fresh=self.ckpt.latest() is None)  # a resume ignores model.init
        model.to(env.device)
        self.flops_per_image = task.flops_per_image(model)
        self.peak_flops = peak_flops(env.device, cfg.train.peak_tflops)
        if self.compile_enabled():
            compile_blocks(model)  # in place: names, registration order and checkpoints unchanged
        optimizer = task.build_optimizer(model)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(cfg, self.accum), dist_init_required=False)
        install_safe_loader(self.engine)

        self.steps_per_epoch = len(task.loader(epoch=0, skip_batches=0)) // self.accum
        if self.steps_per_epoch == 0:
            raise ValueError(f"the data gives less than one global batch of {cfg.train.global_batch_size} per epoch "
                             f"at world size {env.world_size}; use more data or a smaller train.global_batch_size")
        total_steps = self.steps_per_epoch * cfg.train.epochs
        self.end_step = min(total_steps, cfg.train.max_steps or total_steps)

        self.global_step, self.epoch, self.step_in_epoch = 0, 0, 0
        self.resumed_from: Optional[int] = None
        self.last_save_s = 0.0  # how long the last save took (a signal's save must fit its grace period)
        self.stop_signals = StopSignals()
        self.bad_before_epoch: Counter = Counter()  # bad samples skipped in earlier epochs of this process
        run_id = self._resume()
        self.tracker = Tracker(env.is_main and cfg.tracking.enabled,
                               default_tracking_uri(self.run_dir.path, cfg.tracking.tracking_uri),
                               cfg.tracking.experiment, self.run_dir.path)
        self.tracker.start(cfg.tracking.run_name or self.run_dir.path.resolve().name,
                           {**task.tracked_params(flatten(to_dict(cfg))), "world_size": env.world_size,
                            "grad_accum_steps": self.accum, **schedule_summary(cfg, self.steps_per_epoch)}, run_id=run_id)
        if self.resumed_from is None:
            self.tracker.log_artifact(self.run_dir.file(CONFIG))
        if cfg.tracking.system_metrics:
            self.tracker.start_system_metrics()
        self._record_attempt()
        task.started()

    # -- what the task asks of the loop ----------------------------------------------------------

    def compile_enabled(self) -> bool:
        """train.compile, or by default: on a GPU at ZeRO 0-2 (ZeRO-3's parameter hooks and a
        CPU's minutes of compiling are where it does not pay)."""
        choice = self.cfg.train.compile
        return choice if choice is not None else self.env.device.type == "cuda" and self.cfg.train.zero_stage < 3

    @property
    def pin_memory(self) -> bool:
        """Page-locked loader batches, so the prefetcher's copies to the GPU are truly asynchronous."""
        return self.cfg.train.prefetch and self.env.device.type == "cuda"

    def micro_key(self, micro: int, step: Optional[int] = None) -> MicroKey:
        """The key every draw of a micro-batch derives from."""
        return MicroKey(self.cfg.train.seed, self.global_step if step is None else step, self.env.rank, micro)

    # -- setup -------------------------------------------------------------------------------------

    def _check_config_change(self, accept: bool) -> None:
        """A resume never silently changes the run: the saved config against this one (every rank
        reads the same file, so all refuse alike), before anything is overwritten."""
        has_checkpoints = self.ckpt.root.is_dir() and any(self.ckpt.root.iterdir())
        saved = self.run_dir.saved_config() if has_checkpoints else None
        if saved is None:
            return
        changes = check_resume(saved, self.cfg, getattr(self.cfg, "mode", "pretrain"), accept=accept)
        if changes and self.env.is_main:
            print(f"resuming with a changed config: {'; '.join(changes)}", flush=True)

    def _resume(self) -> Optional[str]:
        """Load the newest complete checkpoint that passes its checksums and loads (a damaged one is
        moved aside and the one before it taken), if any; returns the MLflow run id it recorded."""
        self.ckpt.remove_incomplete()
        found = self.ckpt.resume(self.engine)
        if found is None:
            return None
        latest, state = found
        self.global_step, self.epoch, self.step_in_epoch = state["global_step"], state["epoch"], state["step_in_epoch"]
        self.resumed_from = self.global_step
        if self.step_in_epoch >= self.steps_per_epoch:  # saved on an epoch's last step
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        if self.env.is_main:
            self.run_dir.cut_back((METRICS, *self.task.step_logs), self.global_step)
            print(f"resumed from {latest} (step {self.global_step}, epoch {self.epoch})", flush=True)
        return state.get("mlflow_run_id")

    def _record_attempt(self) -> None:
        """One line per start of the run: when, where, at what world size, from which step."""
        if self.env.is_main:
            self.run_dir.append(ATTEMPTS, {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": socket.gethostname(),
                "world_size": self.env.world_size, "resumed_from_step": self.resumed_from,
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "slurm_nodelist": os.environ.get("SLURM_JOB_NODELIST"),
                "mlflow_run_id": self.tracker.run_id})

    # -- the step ----------------------------------------------------------------------------------

    def train_step(self, micro_batches: list[dict]) -> float:
        """One optimizer step over `accum` micro-batches; returns the step's mean loss (all ranks)."""
        step_losses = []
        self.step_extras: dict[str, list[torch.Tensor]] = {}
        for i, batch in enumerate(micro_batches):
            loss, extras = self.task.micro_loss(i, batch)
            for key, value in extras.items():
                self.step_extras.setdefault(key, []).append(value)
            if faults.armed("nan_loss", self.global_step):
                loss = loss * float("nan")
            if faults.armed("nan_grad", self.global_step):  # a finite loss whose gradients are not
                loss.register_hook(lambda grad: grad * float("nan"))
            step_losses.append(loss.detach())
            self.engine.backward(loss)
            if i == len(micro_batches) - 1:
                # The guard before the last step(): a non-finite step is never applied or saved.
                self.step_values = self._guard(step_losses)
            self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if isinstance(norm, float) and not math.isfinite(norm):  # DeepSpeed skipped the step (inf/NaN gradients)
            raise NonFiniteLossError(f"the gradient norm became {norm} at step {self.global_step}; "
                                     "the step was not applied")
        return self.step_values["loss"]

    def _guard(self, step_losses: list[torch.Tensor]) -> dict[str, float]:
        """The step's one host synchronization: the mean loss over the ranks (and the task's
        extras, and where DeepSpeed keeps no gradient norm, our own) read together, checked before
        the step is applied."""
        # one all-reduce carries the loss and whether any rank was asked to stop (SIGTERM / SIGINT)
        stop = float(self.stop_signals.requested is not None)
        summed = all_reduce_sum(torch.stack([torch.stack(step_losses).float().mean(),
                                             torch.tensor(stop, device=step_losses[0].device)]))
        values = {"loss": summed[0] / self.env.world_size, "stop": summed[1]}
        values.update({k: torch.stack(v).float().mean() for k, v in self.step_extras.items()})
        if self.engine.zero_optimization_stage() == 0 and not self.engine.bfloat16_enabled():
            # plain ZeRO-0 fp32: DeepSpeed neither checks nor records the gradient norm; the
            # gradients are whole and already averaged over the ranks here
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            if grads:
                values["grad_norm"] = torch.linalg.vector_norm(
                    torch.stack([n.float() for n in torch._foreach_norm(grads)]))
        t0 = time.perf_counter()
        host = dict(zip(values, torch.stack([v.detach().float().reshape(()) for v in values.values()]).tolist()))
        self.sync_wait = time.perf_counter() - t0
        for key in ("loss", "grad_norm"):
            if key in host and not math.isfinite(host[key]):
                what = "loss" if key == "loss" else "gradient norm"
                raise NonFiniteLossError(f"{what} became {host[key]} at step {self.global_step}; the step was not applied")
        return host

    def _grad_norm(self) -> Optional[float]:
        """The last step's gradient norm before clipping (read at logged steps only)."""
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return self.step_values.get("grad_norm")
        return float(norm)

    def _check_weights(self) -> None:
        """Before a save: every rank's weights (its partition at ZeRO-3) finite and within WEIGHT_LIMIT."""
        params = [getattr(p, "ds_tensor", p) for p in self.engine.module.parameters()]
        params = [p for p in params if p.numel()]
        largest = max(n.float() for n in torch._foreach_norm(params, float("inf"))).item() if params else 0.0
        if any_rank(not largest <= WEIGHT_LIMIT):  # NaN compares false
            raise NonFiniteLossError(f"the weights diverged at step {self.global_step} (largest |w| {largest:.3g} on "
                                     f"some rank, limit {WEIGHT_LIMIT:g}); this step was not saved")

    # -- the loop ----------------------------------------------------------------------------------

    def train(self) -> dict:
        """The loop, with SIGTERM / SIGINT turned into a stop at the next step boundary."""
        self.stop_signals.install()
        try:
            return self._train()
        finally:
            self.stop_signals.uninstall()

    def _train(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        peak = peak_lr(cfg)
        if self.env.is_main:
            print(f"run {self.run_dir.path}: {getattr(cfg.model, 'name', None) or cfg.model.arch}, world size "
                  f"{self.env.world_size}, global batch {t.global_batch_size} = {self.env.world_size} x "
                  f"{t.micro_batch_size} x {self.accum}, {self.steps_per_epoch} steps/epoch, steps "
                  f"{self.global_step}->{self.end_step}, peak lr {peak:.3g}", flush=True)
        started, steps_run = time.perf_counter(), 0
        last_saved = self.resumed_from
        micro_batches = None
        self.window = Counter()  # sums over the steps since the last logged one
        self.task.before_train()
        while self.global_step < self.end_step:
            self.data = self.task.loader(self.epoch, self.step_in_epoch * self.accum)
            steps_here = min(self.steps_per_epoch - self.step_in_epoch, self.end_step - self.global_step)
            batches = iter(DevicePrefetcher(self.data, self.env.device, t.prefetch, limit=steps_here * self.accum))
            while self.step_in_epoch < self.steps_per_epoch and self.global_step < self.end_step:
                t0 = time.perf_counter()
                micro_batches = [next(batches) for _ in range(self.accum)]
                data_wait = time.perf_counter() - t0
                lr = cosine_lr(self.global_step, self.steps_per_epoch, t.epochs, t.warmup_epochs, peak, cfg.optim.min_lr)
                set_lr(self.optimizer, lr)
                loss = self.train_step(micro_batches)
                self.global_step += 1
                self.step_in_epoch += 1
                steps_run += 1
                self.window.update(steps=1, time=time.perf_counter() - t0, wait=data_wait, sync=self.sync_wait)
                if self.global_step % t.log_every_steps == 0 or self.global_step == self.end_step:
                    self._log(loss, lr, started, steps_run)
                if self.step_values["stop"]:  # every rank sees the same sum: all stop after this step
                    self._stop_on_signal(last_saved)
                self.task.after_step(micro_batches)
                if self.global_step % cfg.checkpoint.every_steps == 0:
                    self.save()
                    last_saved = self.global_step
            self.bad_before_epoch.update(self.data.bad_counts)
            if self.step_in_epoch == self.steps_per_epoch:  # epoch finished
                self.task.after_epoch(micro_batches)
                self.epoch += 1
                self.step_in_epoch = 0
        if last_saved != self.global_step:
            self.save()
        self.task.after_train(micro_batches)
        return self._finish()

    def _log(self, loss: float, lr: float, started: float, steps_run: int) -> None:
        """Progress line, metrics.jsonl and MLflow: averages over the steps since the last log."""
        w, self.window = self.window, Counter()
        grad_norm = self._grad_norm()  # every rank: a ZeRO-3 norm read may be collective
        memory = memory_peaks(self.env.device)
        if not self.env.is_main:
            return
        speed = step_speed(self.flops_per_image, self.cfg.train.global_batch_size * w["steps"], w["time"], w["wait"],
                           self.env.world_size, self.peak_flops)
        speed["step_time_s"] = w["time"] / w["steps"]
        speed["data_wait_s"] = w["wait"] / w["steps"]
        eta = (self.end_step - self.global_step) * (time.perf_counter() - started) / steps_run
        bad = self.bad_before_epoch + self.data.bad_counts  # rank 0's share, this process
        bad_note = f" | {sum(bad.values())} bad samples skipped" if bad else ""
        mfu_note = f" | MFU {speed['mfu'] * 100:.1f}%" if speed["mfu"] is not None else ""
        mem_note = f" | mem {memory['mem_allocated_gib']:.1f} GiB" if memory else ""
        print(f"step {self.global_step}/{self.end_step} | epoch {self.epoch} | loss {loss:.4f} | lr {lr:.3g} | "
              f"{speed['images_per_s']:.1f} img/s | step {speed['step_time_s']:.3f}s | data "
              f"{speed['data_wait_share'] * 100:.0f}% | {speed['tflops']:.3g} TFLOP/s{mfu_note}{mem_note} | "
              f"ETA {format_eta(eta)}{bad_note}", flush=True)
        row = {"step": self.global_step, "epoch": self.epoch, "loss": loss, "lr": lr, **speed,
               "sync_wait_s": w["sync"] / w["steps"], "grad_norm": grad_norm,
               "mem_allocated_gib": memory.get("mem_allocated_gib"), "mem_reserved_gib": memory.get("mem_reserved_gib"),
               "bad_samples": sum(bad.values()), **{f"bad_samples_{kind}": n for kind, n in bad.items()},
               **self._source_shares(),
               **{k: v for k, v in self.step_values.items() if k not in ("loss", "grad_norm", "stop")}}
        self.run_dir.append(METRICS, row)
        self.tracker.log_metrics({k: v for k, v in row.items() if k != "step" and v is not None}, step=self.global_step)

    def _source_shares(self) -> dict:
        """A mix of sources: each source's share of the samples rank 0 took this epoch (this process)."""
        seen = getattr(self.data, "source_counts", None)
        total = sum(seen.values()) if seen else 0
        return {f"source_share_{name}": n / total for name, n in sorted(seen.items())} if total else {}

    def _client_state(self) -> dict:
        return {"global_step": self.global_step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "mlflow_run_id": self.tracker.run_id, "world_size": self.env.world_size, "accum": self.accum}

    def _stop_on_signal(self, last_saved: Optional[int]) -> None:
        """After a SIGTERM / SIGINT: save if the last save took no longer than the grace period
        (or none was timed yet), then stop with one line (printed by rank 0)."""
        signum = int(self.stop_signals.requested or signal.SIGTERM)
        grace = self.cfg.checkpoint.signal_grace_s
        if last_saved == self.global_step:
            saved = f"checkpoint step {self.global_step} was already saved"
        elif self.last_save_s <= grace:
            self.save()
            saved = f"saved checkpoint {self.ckpt.latest().name}"
        else:
            saved = (f"no checkpoint: the last save took {self.last_save_s:.1f} s, more than checkpoint.signal_grace_s="
                     f"{grace:g}; the newest is {self.ckpt.latest().name if self.ckpt.latest() else 'none'}")
        if self.env.is_main:
            self.tracker.set_tags({"stopped_by": signal.Signals(signum).name})
            self.tracker.finish("KILLED")
        raise RunInterrupted(f"stopped by {signal.Signals(signum).name} after step {self.global_step}: {saved}; "
                             "run the same command to resume", signum, announce=self.env.is_main)

    def save(self):
        self.task.before_save()
        self._check_weights()
        t0 = time.perf_counter()
        path = self.ckpt.save(self.engine, self.global_step, self._client_state(), self.env.world_size)
        self.last_save_s = time.perf_counter() - t0
        if self.env.is_main:
            self.tracker.set_tags({"last_checkpoint": path.resolve(), "last_checkpoint_step": self.global_step})
        return path

    def _finish(self) -> dict:
        result = {"run_dir": str(self.run_dir.path.resolve()), "checkpoint": str(self.ckpt.latest()),
                  **self.task.result_extra(), "steps": self.global_step,
                  "mlflow_uri": self.tracker.uri, "mlflow_run_id": self.tracker.run_id}
        if self.env.is_main:
            curve = self.run_dir.file(LOSS_CURVE)
            if save_loss_curve(self.run_dir.rows(METRICS), curve):
                self.tracker.log_artifact(curve)
                result["loss_curve"] = str(curve)
            self.tracker.finish("FINISHED")
            self.run_dir.write_json(RESULT, result)
        barrier()
        return result

    def fail(self, message: str) -> None:
        """Record in MLflow why the run stopped (the caller prints the line)."""
        if self.env.is_main:
            self.tracker.set_tags({"failure": message})
            self.tracker.finish("FAILED")
