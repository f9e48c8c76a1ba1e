"""A style LoRA on the demo teacher, then combined with the 4-step student LoRA (no joint training).

LCM-LoRA's claim, on the demo: a distilled LoRA is an acceleration module that also accelerates a base model
carrying a separately trained style LoRA. Steps:

1. Style data (``STYLES``): the teacher's training digits drawn in **bold strokes** (default): the ink
   ``k = (1 - x) / 2`` in [0, 1] of every ``[3, R, R]`` image ``x`` in [-1, 1] (paper +1, ink -1) is grown by a
   3x3 grey dilation, ``x_bold = 1 - 2 * maxfilter3x3(k)``; or in **inverted colours**, ``x_inverted = -x``
   (white digits on black; outside what the demo VAE, trained on dark-on-light digits, can encode).
2. Training (``train_style_lora``): a LoRA ("style") trained the way many field style LoRAs are: attention only
   (q/k/v/out of both streams, ``models.lora.ATTENTION_TARGET_MODULES``), rank 4, learning rate 1e-3, 400 steps,
   with the teacher's own rectified-flow loss ``|v(x_s, s, c) - (eps - x0)|^2`` (``flow_training.train_transformer``:
   the same level sampling, caption dropout 0.1 so the unconditional branch of CFG learns the style too, EMA) on
   the VAE latents of the styled digits; the base stays frozen.
3. Evaluation (``evaluate``), on the demo's distribution metric: the reference is teacher + style at 50 Euler
   steps with true CFG on the seeds A; on the disjoint seeds B: teacher + style at 50 steps (the noise floor),
   teacher + style at 4 Euler steps, teacher + style + student at the student's 4 phase-edge steps (both adapters
   live: ``W x + sum_a s_a (alpha_a / r_a) A_a B_a x``; conditional only, as the student samples), and the teacher
   without style at 50 steps (how far the style moves the statistic). The 4-step rows carry the style at each of
   ``style_scales`` (default 0.9 and 1: combined with a distilled LoRA, the style is down-weighted, as LCM-LoRA's
   users do; the student amplifies the style's velocity change at high noise). ``--without_style`` runs the same
   rows on the plain teacher (the control: what the student gains without a style LoRA).

Per row: the style statistic **ink coverage** (mean ink ``k`` over all pixels of all images; on the training
digits bold strokes raise it from 0.31 to 0.41, inverted colours to 0.69), its relative difference to the
reference, the demo's distribution FID (``distribution_fid.py``: digit-classifier features, disjoint seeds, excess
over the noise floor, each half of the seeds on its own) against the reference, and adherence (share classified
as the prompted digit).
"""
import json
import time
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import paddle

from ppdiffusers_fast.models.lora import (
    DEFAULT_TARGET_MODULES, LoraConfig, inject_trainable_lora, resolve_target_modules, set_adapter_scale, use_adapters,
)
from ppdiffusers_fast.models.lora_io import import_lora, save_lora
from ppdiffusers_fast.schedules import resolution_mu

STYLE_ADAPTER = "style"
STUDENT_ADAPTER = "student"

__all__ = ["bold_strokes", "inverted_colours", "STYLES", "ink_coverage", "train_style_lora", "evaluate", "targets",
           "markdown_table"]


def bold_strokes(images: np.ndarray) -> np.ndarray:
    """Images ``[N, 3, R, R]`` in [-1, 1] (ink -1) with every stroke grown by one pixel (3x3 grey dilation)."""
    ink = (1.0 - images) / 2.0
    padded = np.pad(ink, [(0, 0), (0, 0), (1, 1), (1, 1)], mode="edge")
    size = images.shape[-1]
    grown = np.max([padded[:, :, dy:dy + size, dx:dx + size] for dy in range(3) for dx in range(3)], axis=0)
    return (1.0 - 2.0 * grown).astype(np.float32)


def inverted_colours(images: np.ndarray) -> np.ndarray:
    """Images ``[N, 3, R, R]`` in [-1, 1] with paper and ink swapped: ``-x`` (white digits on black)."""
    return (-images).astype(np.float32)


STYLES = {"bold": bold_strokes, "inverted": inverted_colours}  # style name -> image transform


def ink_coverage(images: np.ndarray) -> float:
    """The style statistic: mean ink ``(1 - x) / 2`` over all pixels of ``images`` ``[N, 3, R, R]`` in [-1, 1]."""
    return float(np.mean((1.0 - np.clip(images, -1.0, 1.0)) / 2.0))


def train_style_lora(teacher, output_path, steps: int = 400, batch_size: int = 32, learning_rate: float = 1e-3,
                     rank: int = 4, seed: int = 0, target_modules: str = "attention", style: str = "bold",
                     log=print) -> dict:
    """Train the "style" LoRA on the ``style`` digits (``STYLES``) with the teacher's flow-matching loss; save it
    to ``output_path``.

    Returns ``{"steps", "final_loss" (mean of the last 50 steps), "seconds", "ink_coverage_data"}``.
    """
    from .config import DemoSplit, TeacherTrainingConfig
    from .data import load_split
    from .flow_training import CachedLatents, train_transformer
    from .vae_training import encode_posterior

    started = time.perf_counter()
    digits = load_split(teacher.resolution, DemoSplit())["teacher_train"]
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}: choose one of {sorted(STYLES)}")
    styled = STYLES[style](digits.images)
    means, stds = encode_posterior(teacher.vae, styled)
    config = teacher.vae.config
    latents = CachedLatents(means, stds, digits.labels, config.shift_factor, config.scaling_factor)
    targets = DEFAULT_TARGET_MODULES if target_modules == "default" else resolve_target_modules(target_modules)
    paddle.seed(seed)  # the LoRA's initial A; the data, levels and noise come from train_transformer's own seed
    inject_trainable_lora(teacher.transformer, LoraConfig(rank=rank, alpha=float(rank), target_modules=targets),
                          STYLE_ADAPTER)
    recipe = TeacherTrainingConfig()
    with use_adapters(teacher.transformer, STYLE_ADAPTER):
        history = train_transformer(
            teacher.transformer, latents, teacher.prompts, steps=steps, batch_size=batch_size,
            learning_rate=learning_rate, warmup_steps=min(20, steps), caption_dropout=recipe.caption_dropout,
            mu=resolution_mu(teacher.image_tokens), logit_normal_std=recipe.logit_normal_std,
            ema_decay=recipe.ema_decay, seed=seed, log=log)
    save_lora(teacher.transformer, STYLE_ADAPTER, output_path)
    final = float(np.mean([h["loss"] for h in history[-50:]]))
    return {"style": style, "steps": steps, "batch_size": batch_size, "learning_rate": learning_rate, "rank": rank,
            "target_modules": target_modules,
            "final_loss": final, "seconds": time.perf_counter() - started,
            "ink_coverage_data": ink_coverage(styled), "ink_coverage_plain_data": ink_coverage(digits.images)}


def evaluate(teacher, classifier, real, style_lora, student_lora, output_dir, images_per_digit: int = 100,
             student_scales: Sequence[Optional[float]] = (None,), style_scales: Sequence[float] = (1.0,),
             grid_columns: int = 6, measure_first_seed: Optional[int] = None) -> dict:
    """The rows described in the module docstring; writes ``style_results.{md,json}`` and ``style_grid.png``.

    The distance is the demo's distribution metric (``distribution_fid.DistributionMetric``): the reference is
    teacher + style at 50 steps on the seeds A, every other row is measured on the disjoint seeds B
    (``images_per_digit`` per digit on both), its excess is its FID minus the floor (teacher + style at 50 steps on
    B), and each half of B (two disjoint seed sets) gives its own excess, so the metric's spread is measured.
    ``real``: the held-out real digits measured (``distribution_fid.real_digits``); ``measure_first_seed``: the
    first seed of B (default ``distribution_fid.MEASURE_SEEDS``'s; another value repeats every row on new seeds).

    ``student_lora``: one file or several (rows for each, the first is the one :func:`targets` judges);
    ``student_scales``: the student's scales (None: its metadata's); ``style_scales``: the style's scale in the
    4-step rows (the reference always carries the style at 1): one teacher 4-Euler row per style scale and one
    student row per student, style scale and student scale. ``style_lora=None``: the same protocol on the plain
    teacher (the control), written as ``without_style_results.*`` / ``without_style_grid.png``.
    """
    from .distribution_fid import (MEASURE_SEEDS, REFERENCE_SEEDS, DistributionMetric, MeasuredSet, MemoryCache,
                                   SeedSet, write_json_atomic)
    from .report import save_comparison_grid, student_images, teacher_images

    output_dir = Path(output_dir)
    styled = style_lora is not None
    style = (STYLE_ADAPTER,) if styled else ()
    style_scales = tuple(style_scales) if styled else (1.0,)
    base = "teacher + style" if styled else "teacher"
    style_modules = len(import_lora(teacher.transformer, style_lora, STYLE_ADAPTER)["modules"]) if styled else 0
    kept = {}  # every sampled teacher set by (seed-set key, steps): its images give the ink coverage and the grid

    def sample_teacher(seed_set, steps, style_scale=1.0, adapters=style):
        if styled:
            set_adapter_scale(teacher.transformer, STYLE_ADAPTER, style_scale)
        with use_adapters(teacher.transformer, *adapters):
            return teacher_images(teacher, seed_set.eval_set(), steps)

    def measure(image_set) -> "MeasuredSet":
        return MeasuredSet.from_images(classifier, image_set.images, image_set.labels, image_set.seconds_per_image)

    def measure_teacher(seed_set, steps):
        kept[(seed_set.key(), steps)] = sample_teacher(seed_set, steps)
        return measure(kept[(seed_set.key(), steps)])

    metric = DistributionMetric(measure_teacher, real, MemoryCache(),
                                REFERENCE_SEEDS.with_images_per_digit(images_per_digit),
                                SeedSet(MEASURE_SEEDS.name, MEASURE_SEEDS.first_seed if measure_first_seed is None
                                        else int(measure_first_seed), images_per_digit))
    reference_images = kept[(metric.reference_seeds.key(), 50)]
    ink_reference = ink_coverage(reference_images.images)

    def row(name, steps, image_set, style_scale=None, student_scale=None, is_reference=False,
            sampler="teacher") -> dict:
        measured = metric.reference if is_reference else measure(image_set)
        ink = ink_coverage(image_set.images)
        columns = ({"fid_disjoint": 0.0, "excess": None, "excess_halves": None, "metric_spread": None,
                    "adherence": measured.adherence, "seconds_per_image": measured.seconds_per_image}
                   if is_reference else metric.row(measured))
        return {"row": name, "sampler": sampler, "steps": steps, "style_scale": style_scale,
                "student_scale": student_scale,
                "seeds": (metric.reference_seeds if is_reference else metric.measure_seeds).key(),
                "images": len(image_set.labels), "ink_coverage": ink, "ink_vs_reference": ink / ink_reference - 1.0,
                **columns}

    def scaled(name, scale):
        return name if not styled or scale == 1.0 else name.replace("+ style", f"+ style at scale {scale:g}")

    first_style = 1.0 if styled else None
    table = [row(f"{base}, 50 Euler steps (reference)", 50, reference_images, first_style, is_reference=True),
             row(f"{base}, 50 Euler steps, other seeds (noise floor)", 50,
                 kept[(metric.measure_seeds.key(), 50)], first_style)]
    panels = [reference_images, kept[(metric.measure_seeds.key(), 50)]]
    euler_sets = {}
    for style_scale in style_scales:
        euler_sets[style_scale] = sample_teacher(metric.measure_seeds, 4, style_scale)
        table.append(row(scaled(f"{base}, 4 Euler steps", style_scale), 4, euler_sets[style_scale],
                         style_scale if styled else None))
    panels.append(euler_sets.get(1.0, euler_sets[style_scales[0]]))  # the style at scale 1 when measured
    student_loras = [student_lora] if isinstance(student_lora, (str, Path)) else list(student_lora)
    for student_index, student_path in enumerate(student_loras):
        which = "" if student_index == 0 else f" ({Path(student_path).parent.name}/{Path(student_path).name})"
        for style_index, style_scale in enumerate(style_scales):
            for scale_index, student_scale in enumerate(student_scales):
                if styled:
                    set_adapter_scale(teacher.transformer, STYLE_ADAPTER, style_scale)
                images = student_images(teacher, student_path, metric.measure_seeds.eval_set(),
                                        f"{STUDENT_ADAPTER}_{student_index}_{style_index}_{scale_index}",
                                        f"student {student_index}", live_with=style, scale=student_scale)
                label = scaled(f"{base} + {images.steps}-step student{which}", style_scale) + (
                    "" if student_scale is None else f", student at scale {student_scale:g}")
                table.append(row(label, images.steps, images, style_scale if styled else None,
                                 student_scale if student_scale is not None else images.extra["sampling"].get(
                                     "lora_scale", 1.0), sampler="student"))
                panels += [images] if len(panels) == 3 else []
    if styled:
        set_adapter_scale(teacher.transformer, STYLE_ADAPTER, 1.0)
        plain = sample_teacher(metric.measure_seeds, 50, adapters=())
        table.append(row("teacher without style, 50 Euler steps", 50, plain))
        panels.append(plain)

    stem = "style" if styled else "without_style"
    save_comparison_grid(output_dir / f"{stem}_grid.png", panels, min(grid_columns, images_per_digit),
                         images_per_digit)
    payload = {"rows": table, "targets": targets(table),
               "style_lora": {"file": str(style_lora), "modules": style_modules} if styled else None,
               "student_loras": [str(path) for path in student_loras], "images_per_digit": images_per_digit,
               "metric": metric.description()}
    write_json_atomic(output_dir / f"{stem}_results.json", payload)
    (output_dir / f"{stem}_results.md").write_text(markdown_table(table) + "\n", encoding="utf-8")
    return payload


def targets(table: Sequence[dict]) -> dict:
    """The two targets, judged on the first student row against the best teacher 4-Euler row (lowest FID over the
    style scales measured: the teacher's own 4 steps at its most favourable style scale).

    ``style_kept``: the student row's ink coverage within 10% of the reference's; ``beats_euler``: its FID below
    that Euler row's on all of B; ``beats_euler_both_halves``: also on each half of B separately (each half's
    excess over its own floor).
    """
    student = next(r for r in table if r["sampler"] == "student")
    euler = min((r for r in table if r["sampler"] == "teacher" and r["steps"] == 4), key=lambda r: r["fid_disjoint"])
    return {"student_row": student["row"], "euler_row": euler["row"],
            "style_kept": abs(student["ink_vs_reference"]) <= 0.10,
            "beats_euler": student["fid_disjoint"] < euler["fid_disjoint"],
            "beats_euler_both_halves": all(s < e for s, e in zip(student["excess_halves"], euler["excess_halves"]))}


def markdown_table(table: Sequence[dict]) -> str:
    """Rows of :func:`evaluate`: the style statistic, the distribution FID, its excess and the halves' excesses."""
    lines = ["| row | steps | ink coverage | vs reference | FID vs reference | excess over floor | "
             "excess, halves 1 / 2 | adherence | s / image |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in table:
        reference = row["excess"] is None
        fid = "0 (reference)" if reference else f"{row['fid_disjoint']:.2f}"
        excess = "" if reference else f"{row['excess']:.2f}"
        halves = "" if reference else " / ".join(f"{h:.2f}" for h in row["excess_halves"])
        lines.append(f"| {row['row']} | {row['steps']} | {row['ink_coverage']:.4f} | "
                     f"{100 * row['ink_vs_reference']:+.1f}% | {fid} | {excess} | {halves} | "
                     f"{100 * row['adherence']:.1f}% | {row['seconds_per_image']:.3f} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    import argparse

    from .classifier import load_classifier
    from .config import CLASSIFIER_WEIGHTS_NAME, DEMO_MODEL_DIR
    from .distribution_fid import REFERENCE_SEEDS, real_digits, write_json_atomic
    from .teacher import DemoTeacher, read_demo_config

    p = argparse.ArgumentParser(description="Train a style LoRA (bold strokes or inverted colours) on the demo "
                                            "teacher and combine it with the 4-step student LoRA (no joint "
                                            "training).")
    p.add_argument("--output_dir", default="outputs/style_lora")
    p.add_argument("--teacher", default=str(DEMO_MODEL_DIR), help="the demo model folder")
    p.add_argument("--student_lora", nargs="+", default=[str(DEMO_MODEL_DIR / "student_lora.safetensors")],
                   help="one or more student LoRAs (rows for each; the first is judged against the targets)")
    p.add_argument("--style_lora", default=None, help="an already trained style LoRA (skips training)")
    p.add_argument("--style", default="bold", choices=sorted(STYLES), help="the style's image transform")
    p.add_argument("--max_train_steps", type=int, default=400)
    p.add_argument("--train_batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--lora_target_modules", default="attention",
                   help="attention (q/k/v/out of both streams, as many field style LoRAs), default (every Linear of "
                        "the blocks), another preset (reference, extended) or module-name suffixes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images_per_digit", type=int, default=100,
                   help="evaluation images per digit and row (the reference and every measured row)")
    p.add_argument("--eval_seed", type=int, default=None,
                   help="first seed of the measured rows (default 200000; the reference keeps its seeds 100000..)")
    p.add_argument("--without_style", action="store_true",
                   help="no style LoRA: the same rows on the plain teacher (the control; nothing is trained)")
    p.add_argument("--student_scales", type=float, nargs="+", default=None,
                   help="one student row per scale (default: the scale of the student's metadata)")
    p.add_argument("--style_scales", type=float, nargs="+", default=[0.9, 1.0],
                   help="the style's scale in the 4-step rows (teacher 4 Euler steps and student; the first student "
                        "row is judged against the best 4-Euler row); the reference always carries the style at 1")
    args = p.parse_args(argv)
    for path in [*args.student_lora, args.style_lora]:
        if path is not None and not Path(path).is_file():
            p.error(f"LoRA file not found: {path}")
    if args.images_per_digit < 2:
        p.error(f"--images_per_digit must be at least 2 (two halves per digit), got {args.images_per_digit}")
    reference_first, count = REFERENCE_SEEDS.first_seed, 10 * args.images_per_digit
    if args.eval_seed is not None and abs(args.eval_seed - reference_first) < count:
        p.error(f"--eval_seed {args.eval_seed}: the measured seeds would overlap the reference's "
                f"{reference_first}..{reference_first + count - 1}")
    started = time.perf_counter()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    training = None
    style_lora = Path(args.style_lora) if args.style_lora else output_dir / "style_lora.safetensors"
    if args.without_style:
        style_lora = None
    elif args.style_lora is None:
        teacher = DemoTeacher.from_folder(args.teacher)
        training = train_style_lora(teacher, style_lora, args.max_train_steps, args.train_batch_size,
                                    args.learning_rate, args.rank, args.seed, args.lora_target_modules, args.style)
        (output_dir / "style_training.json").write_text(json.dumps(training, indent=2), encoding="utf-8")
        print(f"style LoRA {style_lora}: {json.dumps(training)}")
    teacher = DemoTeacher.from_folder(args.teacher)  # a fresh base: the style LoRA is loaded from its file
    classifier = load_classifier(Path(args.teacher) / CLASSIFIER_WEIGHTS_NAME, teacher.resolution)
    result = evaluate(teacher, classifier, real_digits(classifier, read_demo_config(args.teacher)), style_lora,
                      args.student_lora, output_dir, args.images_per_digit,
                      student_scales=args.student_scales or (None,), style_scales=args.style_scales,
                      measure_first_seed=args.eval_seed)
    result.update(training=training, command_seconds=time.perf_counter() - started)
    write_json_atomic(output_dir / f"{'without_style' if args.without_style else 'style'}_results.json", result)
    print(markdown_table(result["rows"]))
    print(f"targets: {json.dumps(result['targets'])}; {result['command_seconds']:.0f} s")
    return result
