"""The demo: distil the bundled tiny FLUX teacher to 4 steps with FLUX-Lightning, then show and measure it.

    python examples/flux_lightning/run_demo.py           # the full demo (about 10 minutes on a busy 2-core CPU)
    bash scripts/train_flux_lightning.sh                 # the same, when no TEACHER is set
    python examples/flux_lightning/run_demo.py --quick   # a few steps on few images (smoke run)

Steps: encode the teacher's training digits (``distill.build_latent_cache``); train the student with the
training entry point (``--method``, default ``flux_lightning``; checkpoints in ``--output_dir``, a rerun
resumes); save the LoRA as ``<output_dir>/student_lora.safetensors`` (run from the repository root with the
default ``--output_dir``, ``examples/flux_lightning/text_to_image_generation_flux_lightning.py`` then uses it
instead of the committed student); measure the teacher at 50 steps (the noise floor) and 4 steps and the student
with the distribution FID (``distribution_fid.py``: seeds disjoint from the 1000-image teacher-50 reference,
excess over the floor, same-seed FID, FID vs real digits, adherence; teacher sets cached in
``<output_dir>/reference``); write ``grid.png``, ``results.md`` and ``results.json`` and print the table. Everything is written under
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

    from ppdiffusers_fast.command_line import CommandLineParser

    p = CommandLineParser(prog="python examples/flux_lightning/run_demo.py", description=__doc__.split("\n\n")[0],
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default=str(QUICK_START_OUTPUT_DIR),
                   help="checkpoints, the LoRA, grid and results (nothing is written elsewhere)")
    p.add_argument("--teacher", default=str(DEMO_MODEL_DIR), help="the demo model folder (FLUX.1-dev layout)")
    p.add_argument("--method", default="flux_lightning", choices=sorted(METHOD_RECIPES),
                   help="distillation recipe (pcm_adv, pcm_adv_dmd: FLUX-Lightning with parts switched off)")
    p.add_argument("--max_train_steps", type=int, default=None, help="training steps (default: the recipe's)")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--images_per_digit", type=int, default=None,
                   help="measured images per digit and row (default 50, i.e. 500 images; --quick: 2)")
    p.add_argument("--reference_cache", default=None,
                   help="where the teacher's image sets are cached (default <output_dir>/reference)")
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
    from .distribution_fid import MEASURE_SEEDS, build_metric, measure_student
    from .report import EvalSet, markdown_table, save_comparison_grid, student_images, teacher_images, write_results
    from .teacher import DemoTeacher, read_demo_config

    folder = Path(args.teacher)
    demo = read_demo_config(folder)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if args.reference_cache is None:
        args.reference_cache = str(output_dir / "reference")
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

    per_digit = args.images_per_digit or (2 if args.quick else 50)
    eval_started = time.perf_counter()
    classifier = load_classifier(folder / CLASSIFIER_WEIGHTS_NAME, demo["resolution"])
    metric = build_metric(teacher, classifier, folder, demo, args.reference_cache, per_digit,
                          reference_images_per_digit=2 if args.quick else 100)
    student_row, _ = measure_student(metric, teacher, classifier, student_lora, "demo_student")
    floor = metric.floor
    table = [{"method": "teacher, 50 Euler steps (noise floor)", "steps": 50, **metric.row(metric.teacher_50)},
             {"method": "teacher, 4 Euler steps", "steps": 4, **metric.teacher_row(4)},
             {"method": f"student ({args.method}), {recipe.multiphase} steps", "steps": recipe.multiphase,
              **student_row}]
    eval_seconds = time.perf_counter() - eval_started

    columns = min(args.grid_columns, per_digit)
    grid_set = EvalSet(columns, MEASURE_SEEDS.first_seed)
    grid_rows = [teacher_images(teacher, grid_set, 50), teacher_images(teacher, grid_set, 4),
                 student_images(teacher, student_lora, grid_set, "demo_student_grid", "student")]
    grid = save_comparison_grid(output_dir / "grid.png", grid_rows, columns, columns)
    excess_teacher_4, excess_student = table[1]["excess"], table[2]["excess"]
    adherence_gap = 100 * (table[0]["adherence"] - table[2]["adherence"])
    checks = {"student_excess_below_teacher_4_excess": excess_student < excess_teacher_4,
              "student_adherence_within_3_points": adherence_gap <= 3.0}
    total = time.perf_counter() - started
    reference = metric.reference_seeds
    header = (f"# Demo: FLUX-Lightning on the tiny digit teacher\n\n"
              f"`python examples/flux_lightning/run_demo.py {' '.join(argv if argv is not None else sys.argv[1:])}`: "
              f"{args.method}, {recipe.max_train_steps} steps (batch {recipe.train_batch_size}, LoRA rank "
              f"{recipe.lora_rank}, lr {recipe.learning_rate:g}, N = {recipe.num_euler_timesteps}, "
              f"K = {recipe.multiphase}). Distribution FID on the digit classifier's 64-d features: every row has "
              f"{10 * per_digit} images from seeds {MEASURE_SEEDS.first_seed}.. and is compared with "
              f"{len(reference.seeds)} teacher-50 images from the disjoint seeds {reference.first_seed}..; the noise "
              f"floor is the teacher's own 50 steps on the row seeds ({floor:.3f}) and excess = FID - floor. "
              f"Same-seed FID: vs the teacher's 50 steps on the row's own seeds; FID real: vs "
              f"{len(metric.real.labels)} held-out real digits.")
    # a smoke run's few images can put the teacher's 4 steps at or below the floor; no ratio is defined then
    ratio_text = (f"ratio {excess_student / excess_teacher_4:.2f}" if excess_teacher_4 > 0 else
                  "no ratio: the teacher's 4-step excess is not above 0 at this set size")
    footer = (f"Student excess {excess_student:.3f} vs the teacher's 4 Euler steps {excess_teacher_4:.3f} "
              f"({ratio_text}); student adherence "
              f"{adherence_gap:+.1f} points below the teacher's 50 steps (target <= 3).\n\n"
              f"Training {train_seconds:.0f} s, evaluation {eval_seconds:.0f} s, total {total:.0f} s.\n\n"
              f"![grid](grid.png) (columns: teacher 50 steps | teacher 4 steps | student)")
    extra = {"method": args.method, "recipe": recipe.__dict__, "checks": checks, "metric": metric.description(),
             "train_seconds": train_seconds, "eval_seconds": eval_seconds, "total_seconds": total,
             "lora": str(student_lora), "grid": str(grid)}
    results = write_results(table, output_dir, "results", header, footer, extra)
    print("\n" + markdown_table(table) + "\n")
    print(f"[demo] {footer.splitlines()[0]}")
    print(f"[demo] checks: {json.dumps(checks)}; total {total:.0f} s; results {results}, grid {grid}")
    return {"table": table, "checks": checks, "lora": student_lora, "total_seconds": total}


if __name__ == "__main__":
    main()
