"""A style LoRA on the demo teacher, then combined with the 4-step student LoRA (no joint training).

LCM-LoRA's claim, on the demo: a distilled LoRA is an acceleration module that also accelerates a base model
carrying a separately trained style LoRA. Steps:

1. Style data: the teacher's training digits drawn in **bold strokes**: the ink ``k = (1 - x) / 2`` in [0, 1] of
   every ``[3, R, R]`` image ``x`` in [-1, 1] (paper +1, ink -1) is grown by a 3x3 grey dilation,
   ``x_bold = 1 - 2 * maxfilter3x3(k)``.
2. Training (``train_style_lora``): a LoRA ("style") on every Linear of the teacher's blocks, trained with the
   teacher's own rectified-flow loss ``|v(x_s, s, c) - (eps - x0)|^2`` (``flow_training.train_transformer``: the
   same level sampling, caption dropout 0.1 so the unconditional branch of CFG learns the style too, EMA) on the
   VAE latents of the bold digits; the base stays frozen.
3. Evaluation (``evaluate``): on seeds disjoint from the reference's,
   teacher + style at 50 Euler steps with true CFG (the reference, on seeds ``reference_seed``..),
   teacher + style at 50 steps on the evaluation seeds (the noise floor of the distance),
   teacher + style at 4 Euler steps, teacher + style + student at the student's 4 phase-edge steps (both adapters
   live: ``W x + sum_a s_a (alpha_a / r_a) A_a B_a x``; conditional only, as the student samples), and the teacher
   without style at 50 steps (how far the style moves the statistic). ``--without_style`` runs the same rows on the
   plain teacher (the control: what the student gains without a style LoRA).

Per row: the style statistic **ink coverage** (mean ink ``k`` over all pixels of all images; bold strokes raise
it), its relative difference to the reference, the distribution FID (digit-classifier features, ``metrics.py``)
against the reference, and adherence (share classified as the prompted digit).
"""
import json
import time
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from ppdiffusers_fast.models.lora import (
    DEFAULT_TARGET_MODULES, LoraConfig, inject_trainable_lora, resolve_target_modules, use_adapters,
)
from ppdiffusers_fast.models.lora_io import import_lora, save_lora
from ppdiffusers_fast.schedules import resolution_mu

STYLE_ADAPTER = "style"
STUDENT_ADAPTER = "student"

__all__ = ["bold_strokes", "ink_coverage", "train_style_lora", "evaluate", "markdown_table"]


def bold_strokes(images: np.ndarray) -> np.ndarray:
    """Images ``[N, 3, R, R]`` in [-1, 1] (ink -1) with every stroke grown by one pixel (3x3 grey dilation)."""
    ink = (1.0 - images) / 2.0
    padded = np.pad(ink, [(0, 0), (0, 0), (1, 1), (1, 1)], mode="edge")
    size = images.shape[-1]
    grown = np.max([padded[:, :, dy:dy + size, dx:dx + size] for dy in range(3) for dx in range(3)], axis=0)
    return (1.0 - 2.0 * grown).astype(np.float32)


def ink_coverage(images: np.ndarray) -> float:
    """The style statistic: mean ink ``(1 - x) / 2`` over all pixels of ``images`` ``[N, 3, R, R]`` in [-1, 1]."""
    return float(np.mean((1.0 - np.clip(images, -1.0, 1.0)) / 2.0))


def train_style_lora(teacher, output_path, steps: int = 400, batch_size: int = 32, learning_rate: float = 2e-3,
                     rank: int = 8, seed: int = 0, target_modules: str = "default", log=print) -> dict:
    """Train the "style" LoRA on bold digits with the teacher's flow-matching loss; save it to ``output_path``.

    Returns ``{"steps", "final_loss" (mean of the last 50 steps), "seconds", "ink_coverage_data"}``.
    """
    from .config import DemoSplit, TeacherTrainingConfig
    from .data import load_split
    from .flow_training import CachedLatents, train_transformer
    from .vae_training import encode_posterior

    started = time.perf_counter()
    digits = load_split(teacher.resolution, DemoSplit())["teacher_train"]
    bold = bold_strokes(digits.images)
    means, stds = encode_posterior(teacher.vae, bold)
    config = teacher.vae.config
    latents = CachedLatents(means, stds, digits.labels, config.shift_factor, config.scaling_factor)
    targets = DEFAULT_TARGET_MODULES if target_modules == "default" else resolve_target_modules(target_modules)
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
    return {"steps": steps, "batch_size": batch_size, "learning_rate": learning_rate, "rank": rank,
            "target_modules": target_modules,
            "final_loss": final, "seconds": time.perf_counter() - started,
            "ink_coverage_data": ink_coverage(bold), "ink_coverage_plain_data": ink_coverage(digits.images)}


def evaluate(teacher, classifier, style_lora, student_lora, output_dir, images_per_digit: int = 30,
             reference_seed: int = 1000, eval_seed: int = 20000, batch_size: int = 100,
             grid_columns: int = 6, student_scales: Sequence[Optional[float]] = (None,)) -> List[dict]:
    """The rows described in the module docstring; writes ``style_results.{md,json}`` and ``style_grid.png``.

    ``student_scales``: one student row per scale (None: the scale of its metadata). ``style_lora=None``: the same
    protocol on the plain teacher (the control), written as ``without_style_results.*`` / ``without_style_grid.png``.
    """
    from .report import EvalSet, ImageSet, save_comparison_grid, student_images, teacher_images
    from .metrics import adherence, feature_fid

    output_dir = Path(output_dir)
    styled = style_lora is not None
    style = (STYLE_ADAPTER,) if styled else ()
    base = "teacher + style" if styled else "teacher"
    style_modules = len(import_lora(teacher.transformer, style_lora, STYLE_ADAPTER)["modules"]) if styled else 0
    reference_set = EvalSet(images_per_digit, reference_seed, batch_size)
    eval_set = reference_set.with_seeds(eval_seed)
    rows: List[ImageSet] = []
    with use_adapters(teacher.transformer, *style):
        reference = teacher_images(teacher, reference_set, 50, f"{base}, 50 Euler steps (reference)")
        rows.append(teacher_images(teacher, eval_set, 50, f"{base}, 50 Euler steps, other seeds (noise floor)"))
        rows.append(teacher_images(teacher, eval_set, 4, f"{base}, 4 Euler steps"))
    for index, scale in enumerate(student_scales):
        label = f"{base} + 4-step student" + ("" if scale is None else f" at scale {scale:g}")
        rows.append(student_images(teacher, student_lora, eval_set, f"{STUDENT_ADAPTER}_{index}", label,
                                   live_with=style, scale=scale))
    if styled:
        with use_adapters(teacher.transformer):
            rows.append(teacher_images(teacher, eval_set, 50, "teacher without style, 50 Euler steps"))

    ink_reference = ink_coverage(reference.images)
    table = []
    for row in [reference] + rows:
        ink = ink_coverage(row.images)
        table.append({
            "row": row.name, "steps": row.steps, "first_seed": reference_seed if row is reference else eval_seed,
            "ink_coverage": ink, "ink_vs_reference": ink / ink_reference - 1.0,
            "fid_vs_reference": 0.0 if row is reference else feature_fid(classifier, row.images, reference.images),
            "adherence": adherence(classifier, row.images, row.labels), "seconds_per_image": row.seconds_per_image,
            "images": len(row.labels)})
    stem = "style" if styled else "without_style"
    panels = [reference] + rows[:3] + (rows[-1:] if styled else [])  # ..., the first student row, no style
    save_comparison_grid(output_dir / f"{stem}_grid.png", panels, min(grid_columns, images_per_digit),
                         images_per_digit)
    payload = {"rows": table, "style_lora": {"file": str(style_lora), "modules": style_modules} if styled else None,
               "student_lora": str(student_lora), "images_per_digit": images_per_digit,
               "reference_seed": reference_seed, "eval_seed": eval_seed}
    (output_dir / f"{stem}_results.json").write_text(json.dumps(payload, indent=2), encoding="utf-8")
    (output_dir / f"{stem}_results.md").write_text(markdown_table(table) + "\n", encoding="utf-8")
    return table


def markdown_table(table: Sequence[dict]) -> str:
    lines = ["| row | steps | ink coverage | vs reference | FID vs reference | adherence | s / image |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in table:
        fid = "0 (reference)" if row["fid_vs_reference"] == 0.0 else f"{row['fid_vs_reference']:.2f}"
        lines.append(f"| {row['row']} | {row['steps']} | {row['ink_coverage']:.4f} | "
                     f"{100 * row['ink_vs_reference']:+.1f}% | {fid} | {100 * row['adherence']:.1f}% | "
                     f"{row['seconds_per_image']:.3f} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    import argparse

    from .classifier import load_classifier
    from .config import CLASSIFIER_WEIGHTS_NAME, DEMO_MODEL_DIR
    from .teacher import DemoTeacher

    p = argparse.ArgumentParser(description="Train a bold-stroke style LoRA on the demo teacher and combine it with "
                                            "the 4-step student LoRA (no joint training).")
    p.add_argument("--output_dir", default="outputs/style_lora")
    p.add_argument("--teacher", default=str(DEMO_MODEL_DIR), help="the demo model folder")
    p.add_argument("--student_lora", default=str(DEMO_MODEL_DIR / "student_lora.safetensors"))
    p.add_argument("--style_lora", default=None, help="an already trained style LoRA (skips training)")
    p.add_argument("--max_train_steps", type=int, default=400)
    p.add_argument("--train_batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lora_target_modules", default="default",
                   help="default (every Linear of the blocks), a preset (reference, extended) or module-name suffixes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images_per_digit", type=int, default=30, help="evaluation images per digit and row")
    p.add_argument("--without_style", action="store_true",
                   help="no style LoRA: the same rows on the plain teacher (the control; nothing is trained)")
    p.add_argument("--student_scales", type=float, nargs="+", default=None,
                   help="one student row per scale (default: the scale of the student's metadata)")
    args = p.parse_args(argv)
    for path in (args.student_lora, args.style_lora):
        if path is not None and not Path(path).is_file():
            p.error(f"LoRA file not found: {path}")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    training = None
    style_lora = Path(args.style_lora) if args.style_lora else output_dir / "style_lora.safetensors"
    if args.without_style:
        style_lora = None
    elif args.style_lora is None:
        teacher = DemoTeacher.from_folder(args.teacher)
        training = train_style_lora(teacher, style_lora, args.max_train_steps, args.train_batch_size,
                                    args.learning_rate, args.rank, args.seed, args.lora_target_modules)
        (output_dir / "style_training.json").write_text(json.dumps(training, indent=2), encoding="utf-8")
        print(f"style LoRA {style_lora}: {json.dumps(training)}")
    teacher = DemoTeacher.from_folder(args.teacher)  # a fresh base: the style LoRA is loaded from its file
    classifier = load_classifier(Path(args.teacher) / CLASSIFIER_WEIGHTS_NAME, teacher.resolution)
    table = evaluate(teacher, classifier, style_lora, args.student_lora, output_dir, args.images_per_digit,
                     student_scales=args.student_scales or (None,))
    print(markdown_table(table))
    return {"training": training, "rows": table}
