"""The demo's ablation: every method at K = 1, 2 and 4 steps, measured with the distribution FID.

    bash scripts/demo_ablation.sh                                    # every row (hours; resumes row by row)
    python examples/flux_lightning/run_demo_ablation.py --methods pcm,flux_lightning --steps 2,4 --seeds 0
    python examples/flux_lightning/run_demo_ablation.py --committed   # only measure the committed students

Rows: the teacher with 1, 2, 4 and 8 Euler steps (references), then one row per (method, K, training seed):
each student trained with the demo recipe of ``distill.METHOD_RECIPES`` (same latent cache, budget, LoRA shape
and learning rate) with K phases, then sampled with its K steps. Metric (``distribution_fid.py``): FID of 1000
images from seeds B against 1000 teacher-50 images from disjoint seeds A, the noise floor (teacher-50 on B) and
``excess = FID - floor``, the same-seed FID, FID vs the 600 held-out real digits, adherence, and the excess on each
half of B (two disjoint seed sets of 500 with their own floors: the metric's own spread). Each finished row is
written to
``<output_dir>/ablation.json`` at once; a rerun skips finished rows and resumes a student from its newest
checkpoint. Writes ``ablation.md`` (rows, then mean and spread per method and K) and ``ablation.png`` (excess
FID against steps per method).
"""
import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .config import CLASSIFIER_WEIGHTS_NAME, DEMO_MODEL_DIR

DEFAULT_METHODS = ("pcm", "pcm_adv", "pcm_adv_dmd", "flux_lightning", "dmd2")
ROW_LABELS = {"pcm": "PCM", "pcm_adv": "PCM + adv", "pcm_adv_dmd": "PCM + adv + DMD",
              "flux_lightning": "FLUX-Lightning (PCM + adv + DMD + reflow)",
              "pcm_2000": "PCM, 2000 steps", "pcm_n16": "PCM, N = 16", "flux_lightning_n16": "FLUX-Lightning, N = 16",
              "flux_lightning_phase_end": "FLUX-Lightning, DMD on the phase-end prediction",
              "flux_lightning_student_x0": "FLUX-Lightning, DMD on x_i - sigma_i v",
              "pcm_dmd_phase_end": "PCM + DMD on the phase-end prediction",
              "pcm_dmd_student_x0": "PCM + DMD on x_i - sigma_i v",
              "dmd2": "DMD2: a rank-64 fake score per generator step, 5 fake-score updates per generator update",
              "dmd2_u5": "DMD2, 5 fake-score updates per generator update",
              "dmd2_u1_fake_lr_1e-2": "DMD2, generator every step, fake-score lr 1e-2",
              "dmd2_shared": "DMD2, one shared fake score",
              "dmd2_shared_renoise": "DMD2, one shared fake score, x0 re-noised between steps",
              "dmd2_shared_gen_lr_1e-3": "DMD2, one shared fake score, generator lr 1e-3",
              "dmd2_per_step": "DMD2, a fake score per generator step",
              "dmd2_renoise": "DMD2, a fake score per generator step, x0 re-noised between steps",
              "dmd2_fake_lr_1e-2": "DMD2, a fake score per generator step, fake-score lr 1e-2",
              "dmd2_fake_rank_64": "DMD2, a fake score per generator step, fake-score rank 64",
              "dmd2_ema": "DMD2, a fake score per generator step, EMA 0.95 of the generator exported"}
TEACHER_STEPS = (1, 2, 4, 8)
COMMITTED_STUDENTS = ("student_lora.safetensors", "student_2step_lora.safetensors", "student_1step_lora.safetensors")
RESULTS_NAME = "ablation.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python examples/flux_lightning/run_demo_ablation.py",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default="outputs/demo_ablation")
    p.add_argument("--teacher", default=str(DEMO_MODEL_DIR))
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="recipes of distill.METHOD_RECIPES")
    p.add_argument("--steps", default="1,2,4", help="student step counts K")
    p.add_argument("--seeds", default="0,1,2", help="training seeds")
    p.add_argument("--max_train_steps", type=int, default=None, help="training budget (default: the recipe's)")
    p.add_argument("--images_per_digit", type=int, default=100, help="measured images per digit and seed set")
    p.add_argument("--reference_cache", default=None, help="cached teacher sets (default <output_dir>/reference)")
    p.add_argument("--teacher_steps", default=",".join(map(str, TEACHER_STEPS)),
                   help="the teacher's Euler step counts measured as reference rows ('' for none)")
    p.add_argument("--committed", action="store_true", help="only measure the committed students of the demo folder")
    p.add_argument("--curves", action="store_true",
                   help="also measure every kept checkpoint of each student (training curves in ablation.json)")
    return p


def row_key(row: dict) -> str:
    return f"{row['method']}|{row['K']}|{row['seed']}"


def load_results(path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    return {"rows": []}


def summarize(rows: Sequence[dict]) -> List[dict]:
    """Mean over training seeds per (method, K), the seed spread (max - min) and the metric spread (mean over the
    rows of |excess(B1) - excess(B2)|, the two halves of the measured seeds)."""
    groups: Dict[tuple, List[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["K"]), []).append(row)
    out = []
    for (method, k), members in groups.items():
        excess = [m["excess"] for m in members]
        spread_metric = [m["metric_spread"] for m in members]
        out.append({"method": method, "K": k, "seeds": len(members),
                    "fid_disjoint": sum(m["fid_disjoint"] for m in members) / len(members),
                    "excess": sum(excess) / len(excess), "seed_spread": max(excess) - min(excess),
                    "metric_spread": sum(spread_metric) / len(spread_metric) if spread_metric else None,
                    "fid_same_seed": sum(m["fid_same_seed"] for m in members) / len(members),
                    "fid_real": sum(m["fid_real"] for m in members) / len(members),
                    "adherence": min(m["adherence"] for m in members)})
    return out


def _num(value, fmt="{:.2f}"):
    return "-" if value is None else fmt.format(value)


def markdown(results: dict, command: str) -> str:
    metric = results.get("metric", {})
    floor = metric.get("floor")
    rows = results["rows"]
    lines = [
        "# Demo ablation: distribution FID at 1, 2 and 4 steps", "",
        f"`{command}`", "",
        f"Reference: {metric.get('reference_images', '?')} teacher-50 images from seeds A; every row measured on "
        f"{metric.get('measured_images', '?')} images from seeds B, disjoint from A. Noise floor (teacher-50 on B vs "
        f"A): {_num(floor if not isinstance(floor, dict) else None, '{:.3f}')}. excess = FID - floor; metric spread = "
        f"|excess on B1 - excess on B2|, the two halves of B (500 images each, each with its own floor). FID on the digit "
        f"classifier's 64-d features; same-seed FID = vs teacher-50 on the row's own seeds (B); FID real = vs the "
        f"{metric.get('real_digits', '?')} held-out real digits.", "",
        "| method | K | seed | FID (disjoint) | excess | metric spread | FID same-seed | FID real | adherence | "
        "train s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['label']} | {row['K']} | {_num(row['seed'], '{}')} | {row['fid_disjoint']:.2f} | "
                     f"{row['excess']:.2f} | {_num(row.get('metric_spread'))} | {row['fid_same_seed']:.2f} | "
                     f"{row['fid_real']:.2f} | {100 * row['adherence']:.1f}% | {_num(row.get('train_seconds'), '{:.0f}')} |")
    students = [r for r in rows if r["kind"] == "student"]
    if students:
        lines += ["", "Per method and K (mean over training seeds; seed spread = max - min of excess; metric spread "
                      "= mean |excess(B1) - excess(B2)|):", "",
                  "| method | K | seeds | mean FID | mean excess | seed spread | metric spread | min adherence |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for s in summarize(students):
            lines.append(f"| {ROW_LABELS.get(s['method'], s['method'])} | {s['K']} | {s['seeds']} | "
                         f"{s['fid_disjoint']:.2f} | {s['excess']:.2f} | {s['seed_spread']:.2f} | "
                         f"{_num(s['metric_spread'])} | {100 * s['adherence']:.1f}% |")
    lines += ["", "![excess FID vs steps](ablation.png)", ""]
    curves = [r for r in rows if r.get("curve")]
    if curves:
        lines += ["## Training curves", "", "Distribution FID (excess) of the kept checkpoints:", "",
                  "| run | " + " | ".join(f"step {p['step']}" for p in curves[0]["curve"]) + " |",
                  "|---|" + "---:|" * len(curves[0]["curve"])]
        for row in curves:
            lines.append(f"| {row['label']} K={row['K']} seed {row['seed']} | " + " | ".join(
                f"{p['fid_disjoint']:.2f} ({p['excess']:.2f})" for p in row["curve"]) + " |")
        lines += ["", "![training curves](ablation_curves.png)", ""]
    return "\n".join(lines)


def save_curves_plot(rows: Sequence[dict], path) -> Optional[Path]:
    """Excess FID at each kept checkpoint, one line per run that has a curve."""
    curves = [r for r in rows if r.get("curve")]
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for row in curves:
        axis.plot([p["step"] for p in row["curve"]], [p["excess"] for p in row["curve"]], marker="o",
                  label=f"{row['label']} K={row['K']} seed {row['seed']}")
    axis.set_yscale("log")
    axis.set_xlabel("training step")
    axis.set_ylabel("excess FID over the noise floor")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return Path(path)


def save_plot(rows: Sequence[dict], path) -> Path:
    """Excess FID (log scale) against sampling steps: the teacher's Euler steps and each method's mean over seeds
    (bars: min and max over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(11, 5))
    teacher = sorted((r["K"], r["excess"]) for r in rows if r["kind"] == "teacher")
    if teacher:
        axis.plot(*zip(*teacher), "k--o", label="teacher, Euler steps")
    students = [r for r in rows if r["kind"] == "student"]
    for method in dict.fromkeys(r["method"] for r in students):
        points = sorted((s["K"], s["excess"], s) for s in summarize([r for r in students if r["method"] == method]))
        ks = [k for k, _, _ in points]
        means = [e for _, e, _ in points]
        members = [[r["excess"] for r in students if r["method"] == method and r["K"] == k] for k in ks]
        low = [m - min(v) for m, v in zip(means, members)]
        high = [max(v) - m for m, v in zip(means, members)]
        axis.errorbar(ks, means, yerr=[low, high], marker="o", capsize=3, label=ROW_LABELS.get(method, method))
    committed = sorted((r["K"], r["excess"]) for r in rows if r["kind"] == "committed")
    if committed:
        axis.plot(*zip(*committed), "k*", markersize=12, linestyle="none", label="committed students")
    axis.set_xscale("log", base=2)
    positive = all(r["excess"] > 0 for r in rows)
    axis.set_yscale("log") if positive else axis.set_yscale("symlog", linthresh=0.5)
    axis.set_xlabel("sampling steps")
    axis.set_ylabel("excess FID over the noise floor (lower is better)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the axes: many rows
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def write_outputs(results: dict, output_dir: Path, command: str) -> None:
    from .distribution_fid import write_json_atomic

    write_json_atomic(output_dir / RESULTS_NAME, results)
    (output_dir / "ablation.md").write_text(markdown(results, command), encoding="utf-8")
    save_plot(results["rows"], output_dir / "ablation.png")
    save_curves_plot(results["rows"], output_dir / "ablation_curves.png")


def train_seconds_of(row_dir: Path, seconds_now: float) -> float:
    """Training seconds of a student, summed over the invocations that trained it (``train_seconds.json``)."""
    record = row_dir / "train_seconds.json"
    total = seconds_now + (json.loads(record.read_text())["train_seconds"] if record.is_file() else 0.0)
    record.write_text(json.dumps({"train_seconds": total}))
    return total


def checkpoint_lora(checkpoint: Path, template: Path, target: Path) -> Path:
    """The exported adapter of a training checkpoint written as a LoRA file, with the keys and sampling metadata of
    ``template`` (the run's exported LoRA); checkpoint names are ``denoiser.transformer.<module>.lora_adapters.
    student.lora_A`` (the method's structured names), ``student_ema`` when the run keeps an EMA that it exports."""
    from ppdiffusers_fast.methods.base import STUDENT, STUDENT_EMA
    from ppdiffusers_fast.models.safetensors_io import load_file, read_header, save_file

    stored = load_file(checkpoint / "trainable.safetensors")
    header, metadata, _ = read_header(template)
    config = json.loads((checkpoint / "config.json").read_text()) if (checkpoint / "config.json").is_file() else {}
    exports_ema = (config.get("dmd2") or {}).get("dmd2_ema_decay") is not None
    adapter = STUDENT_EMA if exports_ema else STUDENT
    keys = list(header)
    tensors = {}
    for key in keys:
        module, _, part = key.rpartition(".")
        name = f"denoiser.transformer.{module}.lora_adapters.{adapter}.{part}"
        if name not in stored:
            raise KeyError(f"{checkpoint}: no {name} for the LoRA key {key}")
        tensors[key] = stored[name]
    return save_file(tensors, target, metadata=metadata)  # atomic


def measure_curve(metric, teacher, classifier, row_dir: Path, lora: Path) -> List[dict]:
    """Distribution FID of every kept checkpoint of a run (its training curve), after the point of step 0: the run's
    LoRA at scale 0, i.e. the base the student starts from, sampled with the student's steps and sampler."""
    from .distribution_fid import measure_student

    start, _ = measure_student(metric, teacher, classifier, lora, adapter_name(f"{row_dir.name}_curve_0"), scale=0.0)
    points = [{"step": 0, **start}]
    print(f"[ablation] {row_dir.name} step 0: FID {start['fid_disjoint']:.2f}, excess {start['excess']:.2f}",
          flush=True)
    for checkpoint in sorted(row_dir.glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[1])):
        step = int(checkpoint.name.split("-")[1])
        exported = checkpoint_lora(checkpoint, lora, row_dir / f"curve_{step}.safetensors")
        measured, _ = measure_student(metric, teacher, classifier, exported,
                                      adapter_name(f"{row_dir.name}_curve_{step}"))
        points.append({"step": step, **measured})
        print(f"[ablation] {row_dir.name} checkpoint {step}: FID {measured['fid_disjoint']:.2f}, excess "
              f"{measured['excess']:.2f}", flush=True)
    return points


def adapter_name(text: str) -> str:
    """An adapter name (an identifier) made from a row name: other characters become ``_``."""
    return re.sub(r"\W", "_", text)


def _split(text: str, cast=str) -> List:
    return [cast(v.strip()) for v in text.split(",") if v.strip()]


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    from .distill import METHOD_RECIPES

    methods, ks, seeds = _split(args.methods), _split(args.steps, int), _split(args.seeds, int)
    unknown = [m for m in methods if m not in METHOD_RECIPES]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {sorted(METHOD_RECIPES)}")
    if any(k < 1 for k in ks):
        raise SystemExit(f"--steps must be positive step counts, got {ks}")
    started = time.perf_counter()
    from .classifier import load_classifier
    from .distill import CACHE_NAME, build_latent_cache, distill, lora_file_name, recipe_for
    from .distribution_fid import build_metric, measure_student
    from .teacher import DemoTeacher, read_demo_config

    folder, output_dir = Path(args.teacher), Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    command = "python examples/flux_lightning/run_demo_ablation.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    demo = read_demo_config(folder)
    teacher = DemoTeacher.from_folder(folder)
    classifier = load_classifier(folder / CLASSIFIER_WEIGHTS_NAME, demo["resolution"])
    metric = build_metric(teacher, classifier, folder, demo, args.reference_cache or output_dir / "reference",
                          args.images_per_digit)
    results = load_results(output_dir / RESULTS_NAME)
    results["metric"] = metric.description()
    done = {row_key(r) for r in results["rows"]}

    def add(row: dict) -> None:
        results["rows"].append(row)
        done.add(row_key(row))
        write_outputs(results, output_dir, command.strip())
        print(f"[ablation] {row['label']} K={row['K']} seed={row['seed']}: FID {row['fid_disjoint']:.2f}, "
              f"excess {row['excess']:.2f}, same-seed {row['fid_same_seed']:.2f}, adherence "
              f"{100 * row['adherence']:.1f}%", flush=True)

    for steps in _split(args.teacher_steps, int):
        row = {"kind": "teacher", "method": "teacher", "label": f"teacher, {steps} Euler steps", "K": steps,
               "seed": None}
        if row_key(row) not in done:
            add({**row, **metric.teacher_row(steps), "train_seconds": None})

    if args.committed:
        measured_methods = {r["method"] for r in results["rows"]}
        for name in COMMITTED_STUDENTS:
            lora = folder / name
            if not lora.is_file() or f"committed:{name}" in measured_methods:
                continue
            measured, sampling = measure_student(metric, teacher, classifier, lora, f"committed_{len(done)}")
            add({"kind": "committed", "method": f"committed:{name}", "label": f"committed {name}",
                 "K": int(sampling["multiphase"]), "seed": None, "sampling": sampling, **measured,
                 "train_seconds": None})
        return results

    cache = output_dir / CACHE_NAME
    for method in methods:
        for k in ks:
            for seed in seeds:
                row = {"kind": "student", "method": method, "label": ROW_LABELS.get(method, method), "K": k,
                       "seed": seed}
                if row_key(row) in done:
                    continue
                if not cache.is_file():
                    build_latent_cache(cache, teacher, folder)
                recipe = recipe_for(method, multiphase=k, max_train_steps=args.max_train_steps)
                row_dir = output_dir / f"{method}_k{k}_s{seed}"
                print(f"[ablation] {method} K={k} seed {seed}: {recipe.max_train_steps} training steps", flush=True)
                begin = time.perf_counter()
                lora = row_dir / lora_file_name(recipe.method)
                if not lora.is_file():  # a finished student is measured as it is
                    lora = distill(recipe, row_dir, folder, seed=seed, data_path=cache,
                                   log=lambda m: print(f"[ablation] {m}", flush=True))
                seconds = train_seconds_of(row_dir, time.perf_counter() - begin)
                measured, sampling = measure_student(metric, teacher, classifier, lora, adapter_name(row_dir.name))
                if args.curves:
                    row["curve"] = measure_curve(metric, teacher, classifier, row_dir, lora)
                add({**row, **measured, "train_seconds": seconds, "train_steps": recipe.max_train_steps,
                     "lora": str(lora)})
    print(f"[ablation] {len(results['rows'])} rows in {output_dir / RESULTS_NAME}; "
          f"{time.perf_counter() - started:.0f} s")
    return results


if __name__ == "__main__":
    main()
