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
    stop if any trainable or EMA weight is NaN/inf                    # nothing written for this update
    log; validate every validation_steps; checkpoint every checkpointing_steps and at the end

``batches`` is any iterator of method-ready batches with ``state_dict()`` / ``set_state_dict()`` (its
position), so resuming restores the data order together with the weights, optimizer and RNG states.
"""
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import paddle

from ..methods.base import DistillationMethod, StepResult
from ..models.finite import describe_non_finite, non_finite_names
from ..models.ops import dense_results
from . import checkpoint as ckpt
from . import distributed as dist
from .logging import NonFiniteLossError, NonFiniteWeightsError, TrainingLogger, check_finite
from .config import config_to_dict
from .optim import (GroupOptimizer, OptimizerSettings, build_group_optimizer, clip_grad_norm,
                    load_optimizer_state, optimizer_state_arrays)
from .precision import Precision, autocast, keep_trainable_in_float32, resolve_precision
from .rng import capture_rng_state, restore_rng_state, seed_everything


def start_process(config) -> Precision:
    """Once per run, before any model is built: start the process group, seed this rank (``--seed`` + rank),
    resolve the precision policy (``config``: the ``TrainConfig``)."""
    dist.init_distributed()
    if config.run.seed is not None:
        seed_everything(config.run.seed + dist.rank())
    return resolve_precision(config.model.mixed_precision, config.model.fp16_opt_level)


def resolve_max_train_steps(optim, batches_per_epoch: Optional[int]) -> int:
    """``--max_train_steps``, or ``--num_train_epochs`` x the updates of one epoch when it is None."""
    if optim.max_train_steps is not None:
        return optim.max_train_steps
    if not batches_per_epoch:
        raise ValueError("--max_train_steps None counts epochs, which needs the data's batches per epoch "
                         "(streamed tar shards have no known length: give --max_train_steps)")
    return optim.num_train_epochs * math.ceil(batches_per_epoch / optim.gradient_accumulation_steps)


TEXT_LOG_FILE = "train_log.txt"  # plain-text training log in --output_dir


@dataclass
class TrainResult:
    step: int  # updates done
    losses: Dict[str, float]  # losses of the last update
    checkpoints: List[str]  # checkpoint folders written in this run
    resumed_from: Optional[str] = None


class Trainer:
    """Trains ``method`` on ``batches`` as the ``TrainConfig`` ``config`` says (its ``optim`` and ``run`` sections,
    ``model.mixed_precision`` / ``fp16_opt_level`` and ``data.train_batch_size``).

    ``precision``: the result of :func:`start_process` when the caller already started the process (the
    training entry point, which needs the weight dtype before it loads the model); otherwise the trainer
    calls it. ``batches_per_epoch``: needed only when ``--max_train_steps`` is None.
    """

    def __init__(self, method: DistillationMethod, batches, config, validator: Optional[Callable] = None,
                 precision: Optional[Precision] = None, batches_per_epoch: Optional[int] = None):
        self.method = method
        self.batches = batches
        self.config = config
        self.validator = validator
        self.precision: Precision = precision if precision is not None else start_process(config)
        self.rank = dist.rank()
        self.world_size = dist.world_size()
        self.max_train_steps = resolve_max_train_steps(config.optim, batches_per_epoch)
        self.optimizers: Dict[str, GroupOptimizer] = {}
        self.writer = ckpt.CheckpointWriter(config.run.output_dir, config.run.checkpoints_total_limit)
        self.step = 0
        self.resume_notes: List[str] = []  # checkpoints skipped by --resume_from_checkpoint latest, and why

    # ------------------------------------------------------------------ set-up
    def _build_optimizers(self) -> None:
        if self.precision.level == "O1":
            keep_trainable_in_float32(self.method.sublayers())
        overrides = self.method.group_hyperparameters()
        optim = self.config.optim
        lr_scale = optim.gradient_accumulation_steps * self.config.data.train_batch_size * self.world_size \
            if optim.scale_lr else 1
        base = OptimizerSettings.from_config(optim, self.max_train_steps, lr_scale)
        named = self.method.named_group_parameters()
        unknown = sorted(set(overrides) - set(named))
        if unknown:
            raise KeyError(f"group_hyperparameters names unknown groups {unknown}; groups: {sorted(named)}")
        for group, params in named.items():
            self.optimizers[group] = build_group_optimizer(group, params, base.updated(**overrides.get(group, {})))

    def _resume(self) -> Optional[Path]:
        """Apply the checkpoint of ``--resume_from_checkpoint`` (every file read and checked before any is used)."""
        contents, self.resume_notes = ckpt.find_resume_checkpoint(self.config.run.resume_from_checkpoint,
                                                                  self.config.run.output_dir)
        if contents is None:
            return None
        path, state = contents.path, contents.state
        if state["world_size"] != self.world_size:
            raise ValueError(f"checkpoint {path} was written by {state['world_size']} processes, this run has "
                             f"{self.world_size}; resume with the same number of processes")
        if sorted(state["groups"]) != sorted(self.optimizers):
            raise KeyError(f"checkpoint {path} has parameter groups {sorted(state['groups'])}, the method has "
                           f"{sorted(self.optimizers)}")
        self.method.load_checkpoint_tensors(contents.trainable)
        for group, optimizer in self.optimizers.items():
            load_optimizer_state(optimizer, contents.optimizers[group], state["groups"][group])
        rank_state = contents.ranks[self.rank]
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
        accumulation = self.config.optim.gradient_accumulation_steps
        loss_sums: Dict[str, float] = defaultdict(float)
        metric_sums: Dict[str, float] = defaultdict(float)
        for _ in range(accumulation):
            batch = next(self.batches)
            with dense_results(), autocast(self.precision):
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
                    with dense_results():
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
        tensors = {name: t.astype("float32").numpy() for name, t in self.method.checkpoint_tensors().items()}
        ckpt.write_json({"rng": capture_rng_state(), "data": self.batches.state_dict(),
                         "trainable_sha256": ckpt.arrays_digest(tensors)}, temp / ckpt.rank_file(self.rank))
        dist.barrier()
        final = self.writer.final_dir(step)
        if self.rank == 0:
            try:
                self._write_rank0_files(temp, tensors)
                final = self.writer.commit(step)
            except BaseException:
                self.writer.abort(step)
                raise
        dist.barrier()
        return final

    def _write_rank0_files(self, temp: Path, tensors: Dict[str, np.ndarray]) -> None:
        optimizer_states = {group: optimizer_state_arrays(optimizer) for group, optimizer in self.optimizers.items()}
        for file_name, arrays in [(ckpt.TRAINABLE_FILE, tensors)] + [
                (ckpt.optimizer_file(group), arrays) for group, (arrays, _) in optimizer_states.items()]:
            bad = non_finite_names(arrays)
            if bad:
                raise RuntimeError(f"refusing to write checkpoint-{self.step}: {file_name} would hold NaN or "
                                   f"infinite values in {describe_non_finite(bad)}")
        ckpt.save_arrays(tensors, temp / ckpt.TRAINABLE_FILE)
        groups = {}
        for group, (arrays, scalars) in optimizer_states.items():
            ckpt.save_arrays(arrays, temp / ckpt.optimizer_file(group))
            groups[group] = scalars
        ckpt.write_json(config_to_dict(self.config), temp / "config.json")
        ckpt.write_json({"format": ckpt.FORMAT_VERSION, "step": self.step, "world_size": self.world_size,
                         "groups": groups}, temp / ckpt.STATE_FILE)

    # ------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        run, optim = self.config.run, self.config.optim
        self.method.train()
        resumed = None
        if not self.optimizers:  # first call; a later call continues up to a raised max_train_steps
            self._build_optimizers()
            resumed = self._resume()
            all_params = [p for opt in self.optimizers.values() for p in opt.params.values()]
            dist.broadcast_parameters(all_params + list(self.method.extra_checkpoint_tensors().values()))

        log_dir = str(Path(run.output_dir) / run.logging_dir)
        Path(run.output_dir).mkdir(parents=True, exist_ok=True)
        logger = TrainingLogger(log_dir, self.rank == 0, self.max_train_steps, self.step, run.report_to,
                                run.tracker_project_name, text_log=str(Path(run.output_dir) / TEXT_LOG_FILE))
        if self.precision.note:
            logger.message(self.precision.note)
        for note in self.resume_notes:
            logger.message(note)
        self.resume_notes = []
        if resumed is not None:
            logger.message(f"resumed from {resumed} at step {self.step}")
        samples_per_update = self.config.data.train_batch_size * optim.gradient_accumulation_steps * self.world_size
        written, losses = [], {}
        try:
            while self.step < self.max_train_steps:
                started = time.perf_counter()
                groups = list(self.method.update_schedule(self.step))
                losses, metrics = self._run_micro_batches(groups)
                names = sorted(losses) + sorted(metrics)
                reduced = dict(zip(names, dist.all_reduce_mean([losses.get(n, metrics.get(n)) for n in names])))
                losses = {n: reduced[n] for n in sorted(losses)}
                check_finite(losses, self.step)
                scalars = self._update(groups)
                self.method.after_update(self.step, groups)
                bad = non_finite_names(self.method.checkpoint_tensors())
                if bad:
                    raise NonFiniteWeightsError(bad, self.step, losses)
                self.step += 1
                seconds = time.perf_counter() - started
                scalars.update({f"loss/{n}": v for n, v in losses.items()})
                scalars.update({f"metric/{n}": reduced[n] for n in metrics})
                scalars.update({"time/step_seconds": seconds, "time/samples_per_second": samples_per_update / seconds})
                logger.log_scalars(self.step, scalars)
                if self.validator is not None and self.rank == 0 and run.validation_steps and \
                        self.step % run.validation_steps == 0:
                    logger.log_images(self.step, "validation", self.validator(self.method))
                if self.step % run.checkpointing_steps == 0 or self.step == self.max_train_steps:
                    written.append(str(self.save_checkpoint()))
        except (NonFiniteLossError, NonFiniteWeightsError) as error:
            logger.message(str(error))
            raise
        finally:
            logger.close()
        self.history = logger.history
        return TrainResult(self.step, losses, written, str(resumed) if resumed else None)
