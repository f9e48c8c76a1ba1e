"""The demo: distil the bundled tiny FLUX teacher to 4 steps with FLUX-Lightning, then show and measure it.

    python examples/flux_lightning/run_demo.py           # the full demo (about 10 minutes on a busy 2-core CPU)
    bash scripts/train_flux_lightning.sh                 # the same, when no TEACHER is set
    python examples/flux_lightning/run_demo.py --quick   # a few steps on few images (smoke run)

Steps: encode the teacher's training digits (``distill.build_latent_cache``); train the student with the
training entry point (``--method``, default ``flux_lightning``; checkpoints in ``--output_dir``, a rerun
resumes); save the LoRA as ``<output_dir>/student_lora.safetensors`` (run from the repository root with the
default ``--output_dir``, ``examples/flux_lightning/text_to_image_generation_flux_lightning.py`` then uses it
instead of the committed student); sample the teacher at 50 and 4 steps and the student at 4 steps from the same
seeds; write ``grid.png``, ``results.md`` and ``results.json`` and print the table. Everything is written under
``--output_dir``; the demo model folder is only read.
"""
import argparse
import json
import sys
import time
from pathlib import Path

from .config import CLASSIFIER_WEIGHTS_NAME, DEMO_MODEL_DIR, QUICK_START_OUTPUT_DIR, STUDENT_LORA_NAME


def build_parser() -> argparse.ArgumentParser:
    from .distill import METHOD_RECIPES

    p = argparse.ArgumentParser(prog="python examples/flux_lightning/run_demo.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default=str(QUICK_START_OUTPUT_DIR),
                   help="checkpoints, the LoRA, grid and results (nothing is written elsewhere)")
    p.add_argument("--teacher", default=str(DEMO_MODEL_DIR), help="the demo model folder (FLUX.1-dev layout)")
    p.add_argument("--method", default="flux_lightning", choices=sorted(METHOD_RECIPES),
                   help="distillation recipe (pcm_adv, pcm_adv_dmd: FLUX-Lightning with parts switched off)")
    p.add_argument("--max_train_steps", type=int, default=None, help="training steps (default: the recipe's)")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--images_per_digit", type=int, default=None,
                   help="evaluation images per digit (default 30, i.e. 300 images; --quick: 2)")
    p.add_argument("--grid_columns", type=int, default=6, help="seeds per digit shown in grid.png")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 4 training steps on 64 digits, 2 evaluation images per digit")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    import paddle  # noqa: F401  (after argument errors, which need no Paddle)

    from .classifier import load_classifier
    from .distill import copy_lora, distill, recipe_for
    from .report import EvalSet, measure, markdown_table, save_comparison_grid, student_images, teacher_images, \
        write_results
    from .teacher import DemoTeacher, read_demo_config

    folder = Path(args.teacher)
    demo = read_demo_config(folder)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    quick = dict(max_train_steps=4, checkpointing_steps=2, train_batch_size=8, lr_warmup_steps=1) if args.quick else {}
    if args.max_train_steps is not None:
        quick["max_train_steps"] = args.max_train_steps
    recipe = recipe_for(args.method, **quick)
    teacher = DemoTeacher.from_folder(folder)
    print(f"[demo] teacher {folder}: {demo['resolution']}x{demo['resolution']} digits, true CFG "
          f"{demo['guidance_scale']}; distilling with {args.method} for {recipe.max_train_steps} steps")

    train_started = time.perf_counter()
    lora = distill(recipe, output_dir, folder, seed=args.seed, teacher=teacher,
                   max_images=64 if args.quick else None, log=lambda m: print(f"[demo] {m}"))
    train_seconds = time.perf_counter() - train_started
    student_lora = copy_lora(lora, output_dir / STUDENT_LORA_NAME)
    print(f"[demo] student LoRA {student_lora}")

    per_digit = args.images_per_digit or (2 if args.quick else 30)
    eval_set = EvalSet(per_digit, int(demo.get("teacher_metrics", {}).get("eval_first_seed", 1000)))
    eval_started = time.perf_counter()
    reference = teacher_images(teacher, eval_set, 50, "teacher, 50 Euler steps (reference)")
    teacher_4 = teacher_images(teacher, eval_set, 4)
    student = student_images(teacher, student_lora, eval_set, "demo_student", f"student ({args.method}), 4 steps")
    classifier = load_classifier(folder / CLASSIFIER_WEIGHTS_NAME, demo["resolution"])
    table = measure(classifier, reference, [reference, teacher_4, student])
    eval_seconds = time.perf_counter() - eval_started

    grid = save_comparison_grid(output_dir / "grid.png", [reference, teacher_4, student],
                                min(args.grid_columns, per_digit), per_digit)
    fid_teacher_4, fid_student = table[1]["fid_vs_teacher_50"], table[2]["fid_vs_teacher_50"]
    adherence_gap = 100 * (table[0]["adherence"] - table[2]["adherence"])
    checks = {"student_fid_at_most_half_teacher_4": fid_student <= 0.5 * fid_teacher_4,
              "student_adherence_within_3_points": adherence_gap <= 3.0}
    total = time.perf_counter() - started
    header = (f"# Demo: FLUX-Lightning on the tiny digit teacher\n\n"
              f"`python examples/flux_lightning/run_demo.py {' '.join(argv if argv is not None else sys.argv[1:])}`: "
              f"{args.method}, {recipe.max_train_steps} steps (batch {recipe.train_batch_size}, LoRA rank "
              f"{recipe.lora_rank}, lr {recipe.learning_rate:g}, N = {recipe.num_euler_timesteps}, "
              f"K = {recipe.multiphase}), {len(reference.labels)} evaluation images "
              f"({per_digit} per digit, seeds {eval_set.first_seed}..{eval_set.first_seed + len(reference.labels) - 1}, "
              f"the same seeds in every row). FID on the digit classifier's 64-d features.")
    footer = (f"Student FID / teacher-4 FID = {fid_student / max(fid_teacher_4, 1e-12):.3f} (target <= 0.5); "
              f"student adherence {adherence_gap:+.1f} points below the teacher's 50 steps (target <= 3).\n\n"
              f"Training {train_seconds:.0f} s, evaluation {eval_seconds:.0f} s, total {total:.0f} s.\n\n"
              f"![grid](grid.png) (columns: teacher 50 steps | teacher 4 steps | student 4 steps)")
    extra = {"method": args.method, "recipe": recipe.__dict__, "checks": checks, "train_seconds": train_seconds,
             "eval_seconds": eval_seconds, "total_seconds": total, "lora": str(student_lora), "grid": str(grid)}
    results = write_results(table, output_dir, "results", header, footer, extra)
    print("\n" + markdown_table(table) + "\n")
    print(f"[demo] {footer.splitlines()[0]}")
    print(f"[demo] checks: {json.dumps(checks)}; total {total:.0f} s; results {results}, grid {grid}")
    return {"table": table, "checks": checks, "lora": student_lora, "total_seconds": total}


if __name__ == "__main__":
    main()
