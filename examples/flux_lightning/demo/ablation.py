"""The demo's ablation: which parts of the FLUX-Lightning recipe help, on the tiny digit teacher.

    bash scripts/demo_ablation.sh                       # all rows, 1000 steps each (about 37 minutes on a 2-core CPU)
    python examples/flux_lightning/run_demo_ablation.py --max_train_steps 100 --rows pcm,flux_lightning

Rows (the table of the paper, on the demo), all measured against the teacher's 50-step images of the same seeds:

    teacher, 50 steps, other seeds   the noise floor of the FID (a different draw of the same distribution)
    teacher, 4 Euler steps           the baseline every student must beat
    pcm                              PCM alone (Huber consistency, K = 4)
    pcm_adv                          + adversarial heads on every block
    pcm_adv_dmd                      + distribution matching, the student as fake score
    flux_lightning                   + reflow: the full recipe
    dmd2                             DMD + GAN with a trained fake-score adapter (2 fake-score updates per generator
                                     update, so it makes half as many generator updates in the same steps)

Every student uses the same latent cache, training seed, step budget, LoRA shape and learning rate
(``distill.METHOD_RECIPES``) and the same evaluation seeds. Writes ``<output_dir>/ablation.md``, ``ablation.json``
and ``ablation.png`` (FID and adherence per row).
"""
import argparse
import sys
import time
from pathlib import Path
from typing import List, Sequence

from .config import CLASSIFIER_WEIGHTS_NAME, DEMO_MODEL_DIR

STUDENT_ROWS = ("pcm", "pcm_adv", "pcm_adv_dmd", "flux_lightning", "dmd2")
ROW_LABELS = {"pcm": "PCM", "pcm_adv": "PCM + adv", "pcm_adv_dmd": "PCM + adv + DMD (student fake score)",
              "flux_lightning": "FLUX-Lightning (PCM + adv + DMD + reflow)", "dmd2": "DMD2 (adapter fake score)"}
OTHER_SEEDS_OFFSET = 100000


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python examples/flux_lightning/run_demo_ablation.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default="outputs/demo_ablation")
    p.add_argument("--teacher", default=str(DEMO_MODEL_DIR))
    p.add_argument("--rows", default=",".join(STUDENT_ROWS), help=f"students to train, from {STUDENT_ROWS}")
    p.add_argument("--max_train_steps", type=int, default=None, help="step budget of every student")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images_per_digit", type=int, default=100)
    return p


def save_plot(table: Sequence[dict], path) -> Path:
    """Two horizontal bar charts: FID vs teacher-50 (lower is better) and adherence (higher is better)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["method"] for row in table][::-1]
    fids = [row["fid_vs_teacher_50"] for row in table][::-1]
    adherences = [100 * row["adherence"] for row in table][::-1]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 0.5 * len(table) + 1.5), sharey=True)
    left.barh(names, fids, color="tab:blue")
    left.set_xlabel("FID vs teacher 50 steps\n(classifier features; lower is better)")
    right.barh(names, adherences, color="tab:green")
    right.set_xlabel("adherence, % classified as the prompt's digit\n(higher is better)")
    for axis, values, fmt in ((left, fids, "{:.2f}"), (right, adherences, "{:.1f}")):
        for y, value in enumerate(values):
            axis.text(value, y, " " + fmt.format(value), va="center", fontsize=8)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main(argv=None) -> List[dict]:
    args = build_parser().parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in STUDENT_ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; choose from {STUDENT_ROWS}")
    started = time.perf_counter()
    from .classifier import load_classifier
    from .distill import CACHE_NAME, build_latent_cache, distill, recipe_for
    from .report import EvalSet, measure, student_images, teacher_images, write_results
    from .teacher import DemoTeacher, read_demo_config

    folder, output_dir = Path(args.teacher), Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    demo = read_demo_config(folder)
    teacher = DemoTeacher.from_folder(folder)
    cache = output_dir / CACHE_NAME
    if not cache.is_file():
        build_latent_cache(cache, teacher, folder)

    trained = {}
    for name in rows:
        recipe = recipe_for(name, max_train_steps=args.max_train_steps)
        print(f"[ablation] training {name} ({recipe.method}) for {recipe.max_train_steps} steps")
        begin = time.perf_counter()
        lora = distill(recipe, output_dir / name, folder, seed=args.seed, data_path=cache,
                       log=lambda m: print(f"[ablation] {m}"))
        trained[name] = (lora, recipe, time.perf_counter() - begin)

    eval_set = EvalSet(args.images_per_digit, int(demo.get("teacher_metrics", {}).get("eval_first_seed", 1000)))
    reference = teacher_images(teacher, eval_set, 50, "teacher, 50 Euler steps (reference)")
    image_rows = [reference,
                  teacher_images(teacher, eval_set.with_seeds(eval_set.first_seed + OTHER_SEEDS_OFFSET), 50,
                                 "teacher, 50 Euler steps, other seeds (noise floor)"),
                  teacher_images(teacher, eval_set, 4)]
    for name, (lora, recipe, seconds) in trained.items():
        row = student_images(teacher, lora, eval_set, f"ablation_{name}", ROW_LABELS[name])
        row.extra.update({"train_seconds": seconds, "train_steps": recipe.max_train_steps})
        image_rows.append(row)
    classifier = load_classifier(folder / CLASSIFIER_WEIGHTS_NAME, demo["resolution"])
    table = measure(classifier, reference, image_rows)
    for entry, row in zip(table, image_rows):
        entry["train_seconds"] = row.extra.get("train_seconds")
    steps = {recipe.max_train_steps for _, recipe, _ in trained.values()}
    total = time.perf_counter() - started
    command = "python examples/flux_lightning/run_demo_ablation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (f"# Demo ablation\n\n`{command.strip()}` (or `bash scripts/demo_ablation.sh`): every student trained "
              f"for {', '.join(map(str, sorted(steps)))} steps from the same latent cache and seed "
              f"{args.seed}; {len(reference.labels)} evaluation images ({args.images_per_digit} per digit), the "
              f"same seeds in every row except the noise floor. FID on the digit classifier's 64-d features.")
    train_lines = [f"- {ROW_LABELS[n]}: {s:.0f} s of training" for n, (_, _, s) in trained.items()]
    footer = "Training time per student:\n" + "\n".join(train_lines) + f"\n\nTotal {total:.0f} s.\n\n" \
        "![ablation](ablation.png)"
    results = write_results(table, output_dir, "ablation", header, footer,
                            {"recipes": {n: r.__dict__ for n, (_, r, _) in trained.items()}, "total_seconds": total})
    plot = save_plot(table, output_dir / "ablation.png")
    print(results.read_text(encoding="utf-8"))
    print(f"[ablation] wrote {results} and {plot} in {total:.0f} s")
    return table


if __name__ == "__main__":
    main()
