"""The one trainer: backward, gradient averaging, clipping, optimizer steps, logging, checkpoints.

It knows a method only through ``methods.base.DistillationMethod`` (parameter groups, update schedule,
``train_step`` returning named losses per group). One optimizer update ``step`` is:

    groups = method.update_schedule(step)
    for each of gradient_accumulation_steps micro-batches:
        for result in method.train_step(next(batches), step):       # under bf16 autocast on GPU
            backward(sum(result.losses) / accumulation) into result.group only
    stop if any loss (mean over ranks) is NaN/inf                     # no optimizer step, no checkpoint
    for group in groups: all-reduce grads, clip (stop if a norm is NaN/inf), then AdamW step
    every group's LR schedule steps (schedules are functions of the global update count)
    method.after_update(step, groups)                                 # EMA
    log; validate every validation_steps; checkpoint every checkpointing_steps and at the end

``batches`` is any iterator of method-ready batches with ``state_dict()`` / ``set_state_dict()`` (its
position), so resuming restores the data order together with the weights, optimizer and RNG states.
"""
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import paddle

from ..methods.base import DistillationMethod, StepResult
from . import checkpoint as ckpt
from . import distributed as dist
from .logging import NonFiniteLossError, TrainingLogger, check_finite
from .optim import (GroupOptimizer, OptimizerSettings, build_group_optimizer, clip_grad_norm,
                    load_optimizer_state, optimizer_state_arrays)
from .precision import Precision, autocast, keep_trainable_in_float32, resolve_precision
from .rng import capture_rng_state, restore_rng_state, seed_everything


@dataclass
class TrainerSettings:
    output_dir: str  # checkpoints and logs
    max_train_steps: int  # optimizer updates in total
    gradient_accumulation_steps: int = 1  # micro-batches per update
    checkpointing_steps: int = 1000  # checkpoint every N updates (and at the end)
    checkpoints_total_limit: Optional[int] = None  # keep the newest M checkpoints
    resume_from_checkpoint: Optional[str] = None  # "latest", a path, or None
    seed: Optional[int] = None  # base seed; rank r uses seed + r
    validation_steps: int = 0  # validation images every N updates (0 = never)
    logging_dir: str = "logs"  # VisualDL folder under output_dir
    report_to: str = "visualdl"  # "visualdl" or "none"
    run_name: str = "train"  # VisualDL display name
    mixed_precision: str = "no"  # no | bf16 (fp32 on CPU)
    fp16_opt_level: str = "O1"  # O1 | O2
    micro_batch_size: int = 1  # samples per micro-batch per rank (for samples/s)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)  # defaults of every group
    config: Optional[dict] = None  # resolved config saved beside every checkpoint


@dataclass
class TrainResult:
    step: int  # updates done
    losses: Dict[str, float]  # losses of the last update
    checkpoints: List[str]  # checkpoint folders written in this run
    resumed_from: Optional[str] = None


class Trainer:
    def __init__(self, method: DistillationMethod, batches, settings: TrainerSettings,
                 validator: Optional[Callable] = None):
        self.method = method
        self.batches = batches
        self.settings = settings
        self.validator = validator
        self.rank = dist.rank()
        self.world_size = dist.world_size()
        self.precision: Precision = resolve_precision(settings.mixed_precision, settings.fp16_opt_level)
        self.optimizers: Dict[str, GroupOptimizer] = {}
        self.writer = ckpt.CheckpointWriter(settings.output_dir, settings.checkpoints_total_limit)
        self.step = 0

    # ------------------------------------------------------------------ set-up
    def _build_optimizers(self) -> None:
        if self.precision.level == "O1":
            keep_trainable_in_float32(self.method.sublayers())
        overrides = self.method.group_hyperparameters()
        base = self.settings.optimizer.updated(total_steps=self.settings.max_train_steps)
        named = self.method.named_group_parameters()
        unknown = sorted(set(overrides) - set(named))
        if unknown:
            raise KeyError(f"group_hyperparameters names unknown groups {unknown}; groups: {sorted(named)}")
        for group, params in named.items():
            self.optimizers[group] = build_group_optimizer(group, params, base.updated(**overrides.get(group, {})))

    def _resume(self) -> Optional[Path]:
        path = ckpt.resolve_resume_path(self.settings.resume_from_checkpoint, self.settings.output_dir)
        if path is None:
            return None
        state = ckpt.load_training_state(path)
        if state["world_size"] != self.world_size:
            raise ValueError(f"checkpoint {path} was written by {state['world_size']} processes, this run has "
                             f"{self.world_size}; resume with the same number of processes")
        if sorted(state["groups"]) != sorted(self.optimizers):
            raise KeyError(f"checkpoint {path} has parameter groups {sorted(state['groups'])}, the method has "
                           f"{sorted(self.optimizers)}")
        self.method.load_checkpoint_tensors(ckpt.load_trainable(path))
        for group, optimizer in self.optimizers.items():
            load_optimizer_state(optimizer, ckpt.load_optimizer_arrays(path, group), state["groups"][group])
        rank_state = ckpt.load_rank_state(path, self.rank)
        restore_rng_state(rank_state["rng"])
        self.batches.set_state_dict(rank_state["data"])
        self.step = int(state["step"])
        return path

    # ------------------------------------------------------------------ one update
    def _backward(self, loss: paddle.Tensor, group: str) -> None:
        """Back-propagate ``loss`` into ``group`` only: other groups' gradients are left as they were."""
        others = [p for name, opt in self.optimizers.items() if name != group for p in opt.params.values()]
        saved = {id(p): p.grad.clone() for p in others if p.grad is not None}
        loss.backward()
        for param in others:
            if id(param) in saved:
                param.grad.set_value(saved[id(param)])
            elif param.grad is not None:
                param.clear_gradient(set_to_zero=False)

    def _run_micro_batches(self, groups: List[str]):
        accumulation = self.settings.gradient_accumulation_steps
        loss_sums: Dict[str, float] = defaultdict(float)
        metric_sums: Dict[str, float] = defaultdict(float)
        for _ in range(accumulation):
            batch = next(self.batches)
            with autocast(self.precision):
                results = self.method.train_step(batch, self.step)
            results = [results] if isinstance(results, StepResult) else list(results)
            for result in results:
                if result.group not in groups:
                    raise ValueError(f"train_step returned losses for group '{result.group}' at step {self.step}, "
                                     f"but update_schedule({self.step}) = {groups}")
                for name, value in result.losses.items():
                    loss_sums[name] += value.item() / accumulation
                for name, value in result.metrics.items():
                    metric_sums[name] += float(value) / accumulation
                if all(np.isfinite(v) for v in loss_sums.values()):
                    self._backward(result.total() / accumulation, result.group)
        return dict(loss_sums), dict(metric_sums)

    def _update(self, groups: List[str]) -> Dict[str, float]:
        """Average, clip and apply the gradients of ``groups``; nothing is applied if any norm is NaN/inf."""
        scalars = {}
        for group in groups:
            optimizer = self.optimizers[group]
            params = list(optimizer.params.values())
            dist.all_reduce_gradients(params)
            scalars[f"grad_norm/{group}"] = clip_grad_norm(params, optimizer.settings.max_grad_norm)
        check_finite(scalars, self.step)
        for group in groups:
            optimizer = self.optimizers[group]
            scalars[f"lr/{group}"] = optimizer.scheduler.last_lr
            optimizer.optimizer.step()
            optimizer.optimizer.clear_grad(set_to_zero=False)
        for optimizer in self.optimizers.values():  # schedules follow the global update count
            optimizer.scheduler.step()
        return scalars

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Write ``checkpoint-<step>`` atomically (every rank adds its RNG and data position)."""
        step = self.step
        if self.rank == 0:
            temp = self.writer.begin(step)
        dist.barrier()
        temp = self.writer.temp_dir(step)
        ckpt.write_json({"rng": capture_rng_state(), "data": self.batches.state_dict()},
                        temp / ckpt.rank_file(self.rank))
        dist.barrier()
        final = self.writer.final_dir(step)
        if self.rank == 0:
            try:
                self._write_rank0_files(temp)
                final = self.writer.commit(step)
            except BaseException:
                self.writer.abort(step)
                raise
        dist.barrier()
        return final

    def _write_rank0_files(self, temp: Path) -> None:
        tensors = {name: t.astype("float32").numpy() for name, t in self.method.checkpoint_tensors().items()}
        ckpt.save_arrays(tensors, temp / ckpt.TRAINABLE_FILE)
        groups = {}
        for group, optimizer in self.optimizers.items():
            arrays, scalars = optimizer_state_arrays(optimizer)
            ckpt.save_arrays(arrays, temp / ckpt.optimizer_file(group))
            groups[group] = scalars
        if self.settings.config is not None:
            ckpt.write_json(self.settings.config, temp / "config.json")
        ckpt.write_json({"format": ckpt.FORMAT_VERSION, "step": self.step, "world_size": self.world_size,
                         "groups": groups}, temp / ckpt.STATE_FILE)

    # ------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        settings = self.settings
        self.method.train()
        resumed = None
        if not self.optimizers:  # first call; a later call continues up to a raised max_train_steps
            dist.init_distributed()
            self._build_optimizers()
            resumed = self._resume()
            if resumed is None and settings.seed is not None:
                seed_everything(settings.seed + self.rank)
            all_params = [p for opt in self.optimizers.values() for p in opt.params.values()]
            dist.broadcast_parameters(all_params + list(self.method.extra_checkpoint_tensors().values()))

        log_dir = str(Path(settings.output_dir) / settings.logging_dir)
        logger = TrainingLogger(log_dir, self.rank == 0, settings.max_train_steps, self.step, settings.report_to,
                                settings.run_name)
        if self.precision.note:
            logger.message(self.precision.note)
        if resumed is not None:
            logger.message(f"resumed from {resumed} at step {self.step}")
        samples_per_update = settings.micro_batch_size * settings.gradient_accumulation_steps * self.world_size
        written, losses = [], {}
        try:
            while self.step < settings.max_train_steps:
                started = time.perf_counter()
                groups = list(self.method.update_schedule(self.step))
                losses, metrics = self._run_micro_batches(groups)
                names = sorted(losses) + sorted(metrics)
                reduced = dict(zip(names, dist.all_reduce_mean([losses.get(n, metrics.get(n)) for n in names])))
                losses = {n: reduced[n] for n in sorted(losses)}
                check_finite(losses, self.step)
                scalars = self._update(groups)
                self.method.after_update(self.step, groups)
                self.step += 1
                seconds = time.perf_counter() - started
                scalars.update({f"loss/{n}": v for n, v in losses.items()})
                scalars.update({f"metric/{n}": reduced[n] for n in metrics})
                scalars.update({"time/step_seconds": seconds, "time/samples_per_second": samples_per_update / seconds})
                logger.log_scalars(self.step, scalars)
                if self.validator is not None and self.rank == 0 and settings.validation_steps and \
                        self.step % settings.validation_steps == 0:
                    logger.log_images(self.step, "validation", self.validator(self.method))
                if self.step % settings.checkpointing_steps == 0 or self.step == settings.max_train_steps:
                    written.append(str(self.save_checkpoint()))
        except NonFiniteLossError as error:
            logger.message(str(error))
            raise
        finally:
            logger.close()
        self.history = logger.history
        return TrainResult(self.step, losses, written, str(resumed) if resumed else None)
