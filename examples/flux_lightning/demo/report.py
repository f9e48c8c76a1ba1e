"""Generate and report the demo: teacher and student image sets, the results table, the comparison grid.

Every image set is ``[N, 3, R, R]`` for the labels ``0,0,..,9,9`` (``images_per_digit`` each) from the seeds
``first_seed + i`` (the noise ``FluxPipeline(seed=...)`` draws); ``distribution_fid.py`` measures them (FID
with disjoint seeds, excess over the noise floor, same-seed FID, FID vs real digits, adherence), and
``s / image`` is the wall time of sampling and decoding divided by the number of images.

Samplers: the teacher takes FLUX's ``n``-step Euler levels with true CFG (two passes per step); a student takes
the K steps between the phase edges its LoRA metadata names (``schedules.phase_sigmas``), Euler jumps or, when the
metadata names ``"sampler": "renoise"``, its x0 predictions re-noised with the seeds' step noise
(``seeded_step_noise``), conditional only (one pass per step), exactly as ``FluxPipeline`` samples with the LoRA
loaded.
"""
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import paddle
from tqdm.auto import tqdm

from ppdiffusers_fast import schedules
from ppdiffusers_fast.models.lora import set_adapter_scale, use_adapters
from ppdiffusers_fast.models.lora_io import load_lora
from ppdiffusers_fast.pipelines.latents import pack_latents, seeded_step_noise
from ppdiffusers_fast.schedulers.samplers import few_step_sampler
from .metrics import eval_labels_and_seeds, save_digit_grid
from .teacher import DemoTeacher, euler_sigmas

__all__ = ["EvalSet", "ImageSet", "teacher_images", "load_student", "sample_student", "student_images",
           "markdown_table", "write_results", "save_comparison_grid"]


@dataclass
class EvalSet:
    """Labels and seeds of the evaluation images (``images_per_digit`` per digit, seeds from ``first_seed``)."""

    images_per_digit: int = 30
    first_seed: int = 1000
    batch_size: int = 100

    @property
    def labels_and_seeds(self):
        return eval_labels_and_seeds(self.images_per_digit, self.first_seed)

    def with_seeds(self, first_seed: int) -> "EvalSet":
        return EvalSet(self.images_per_digit, first_seed, self.batch_size)


@dataclass
class ImageSet:
    """One row: images ``[N, 3, R, R]`` in [-1, 1] of ``labels`` with their sampler and timing."""

    name: str
    steps: int
    images: np.ndarray
    labels: List[int]
    seconds_per_image: float
    note: str = ""
    extra: dict = field(default_factory=dict)


def _sample_in_batches(sample_fn, labels, seeds, batch_size: int, desc: str):
    out = []
    started = time.perf_counter()
    for start in tqdm(range(0, len(labels), batch_size), desc=desc, dynamic_ncols=True, leave=False):
        out.append(sample_fn(labels[start:start + batch_size], seeds[start:start + batch_size]))
    seconds = time.perf_counter() - started
    return np.concatenate(out), seconds / len(labels)


def teacher_images(teacher: DemoTeacher, eval_set: EvalSet, steps: int, name: Optional[str] = None,
                   note: str = "") -> ImageSet:
    """The teacher with ``steps`` Euler steps (FLUX's levels) and its true CFG."""
    labels, seeds = eval_set.labels_and_seeds
    images, per_image = _sample_in_batches(lambda lab, sd: teacher.decode(teacher.sample_latents(lab, sd, steps)),
                                           labels, seeds, eval_set.batch_size, f"teacher {steps} steps")
    return ImageSet(name or f"teacher, {steps} Euler steps", steps, images, labels, per_image, note)


def load_student(teacher: DemoTeacher, lora_path, adapter_name: str, scale: Optional[float] = None):
    """Load a student LoRA as adapter ``adapter_name`` (not live); returns ``(sampling metadata, sigmas [K + 1])``.

    The sigmas are the K Euler jumps between the phase edges its metadata names (``schedules.phase_sigmas``);
    ``scale``: the student's scale (default: its metadata's ``lora_scale``).
    """
    metadata = load_lora(teacher.transformer, lora_path, adapter_name)
    sampling = metadata.get("sampling") or {}
    missing = [k for k in ("multiphase", "num_euler_timesteps") if k not in sampling]
    if missing:
        raise ValueError(f"{lora_path}: the LoRA's sampling metadata lacks {missing}")
    scale = float(sampling.get("lora_scale", 1.0) if scale is None else scale)
    set_adapter_scale(teacher.transformer, adapter_name, scale)
    sigmas = schedules.phase_sigmas(int(sampling["multiphase"]), int(sampling["num_euler_timesteps"]),
                                    schedules.resolution_mu(teacher.image_tokens))
    return sampling, sigmas


def sample_student(teacher: DemoTeacher, adapter_name: str, sigmas, eval_set: EvalSet, name: str,
                   note: str = "", extra: Optional[dict] = None, live_with: Sequence[str] = (),
                   sampling: Optional[dict] = None) -> ImageSet:
    """Images of a loaded student adapter over ``sigmas``, conditional only (one pass per step), with the sampler
    its ``sampling`` metadata names (Euler jumps when None).

    ``live_with``: adapters already in the model that stay live with the student (e.g. a style LoRA).
    """
    labels, seeds = eval_set.labels_and_seeds

    def sample(lab, sd):
        sequence, pooled = teacher.prompts.take(np.asarray(lab))

        def velocity(x, s):
            with use_adapters(teacher.transformer, adapter_name, *live_with):
                return teacher.transformer(x, sequence, pooled, s, teacher.img_ids, teacher.txt_ids, None,
                                           return_dict=False)[0]

        def step_noise(i, shape):  # the pipeline's per-seed step noise, in the packed layout
            side = teacher.latent_size
            channels = teacher.transformer.config.in_channels // 4
            return pack_latents(seeded_step_noise(list(sd), i, [channels, side, side]))
        with paddle.no_grad():
            loop = few_step_sampler(sampling, step_noise)
            return teacher.decode(loop(velocity, teacher.initial_noise(sd), sigmas))

    images, per_image = _sample_in_batches(sample, labels, seeds, eval_set.batch_size, f"{name}")
    return ImageSet(name, len(sigmas) - 1, images, labels, per_image, note, dict(extra or {}))


def student_images(teacher: DemoTeacher, lora_path, eval_set: EvalSet, adapter_name: str, name: str,
                   note: str = "", live_with: Sequence[str] = (), scale: Optional[float] = None) -> ImageSet:
    """A student LoRA on the teacher's base, sampled with the steps and levels of its metadata.

    ``live_with``: adapters already in the model that stay live with the student (e.g. a style LoRA);
    ``scale``: the student's scale (default: its metadata's ``lora_scale``).
    """
    sampling, sigmas = load_student(teacher, lora_path, adapter_name, scale)
    return sample_student(teacher, adapter_name, sigmas, eval_set, name, note, {"sampling": sampling}, live_with,
                          sampling)


def markdown_table(table: Sequence[dict]) -> str:
    """Rows of the distribution metric (``distribution_fid.DistributionMetric.row`` plus method and steps)."""
    lines = ["| method | steps | FID (disjoint seeds) | excess over floor | FID same-seed | FID real | adherence | "
             "s / image |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in table:
        lines.append(f"| {row['method']} | {row['steps']} | {row['fid_disjoint']:.3f} | {row['excess']:.3f} | "
                     f"{row['fid_same_seed']:.3f} | {row['fid_real']:.3f} | {100 * row['adherence']:.1f}% | "
                     f"{row['seconds_per_image']:.4f} |")
    return "\n".join(lines)


def write_results(table: Sequence[dict], output_dir, stem: str, header: str = "", footer: str = "",
                  extra: Optional[dict] = None) -> Path:
    """``<stem>.md`` (header, table, footer) and ``<stem>.json`` (rows + extra) in ``output_dir``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    text = "\n\n".join(part for part in (header.strip(), markdown_table(table), footer.strip()) if part) + "\n"
    (output_dir / f"{stem}.md").write_text(text, encoding="utf-8")
    payload = {"rows": list(table), **(extra or {})}
    (output_dir / f"{stem}.json").write_text(json.dumps(payload, indent=2), encoding="utf-8")
    return output_dir / f"{stem}.md"


def save_comparison_grid(path, rows: Sequence[ImageSet], columns: int, images_per_digit: int) -> Path:
    """Panels side by side (one per row set, e.g. teacher 50 / teacher 4 / student 4): rows digits 0-9, the first
    ``columns`` seeds of each digit (the same seeds in every panel)."""
    if columns > images_per_digit:
        raise ValueError(f"grid columns {columns} exceed the {images_per_digit} images per digit")
    take = np.array([d * images_per_digit + c for d in range(10) for c in range(columns)])
    return save_digit_grid(path, [row.images[take] for row in rows], columns)
