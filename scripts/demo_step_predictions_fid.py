"""FID of a demo student's clean prediction at each of its K steps (where a few-step generator gains or loses).

    python scripts/demo_step_predictions_fid.py outputs/demo_ablation/dmd2_k4_s0/dmd2_lora.safetensors \
        --reference_cache outputs/demo_ablation/reference

The student samples the metric's seeds B (1000 images) with its own steps and sampler; the prediction
``x0_hat_k = x_k - t_k v`` of every step k is decoded and measured like a row of the ablation
(``distribution_fid``: FID against the 1000 teacher-50 images of seeds A) and by the trace of its classifier-feature
covariance (its spread; the reference's is printed next to it). The last step's prediction is the sample itself.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "flux_lightning"))

from demo.classifier import load_classifier  # noqa: E402  (the demo is example code)
from demo.config import CLASSIFIER_WEIGHTS_NAME, DEMO_MODEL_DIR  # noqa: E402
from demo.distribution_fid import MeasuredSet, build_metric  # noqa: E402
from demo.report import load_student  # noqa: E402
from demo.teacher import DemoTeacher, read_demo_config  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lora", help="a student LoRA with sampling metadata")
    parser.add_argument("--teacher", default=str(DEMO_MODEL_DIR))
    parser.add_argument("--reference_cache", default="outputs/demo_ablation/reference",
                        help="cached teacher sets (built when missing)")
    parser.add_argument("--scale", type=float, default=None, help="LoRA scale (default its metadata's)")
    args = parser.parse_args(argv)
    if not Path(args.lora).is_file():
        parser.error(f"no LoRA file at {args.lora}")

    import paddle

    from ppdiffusers_fast.models.lora import use_adapters
    from ppdiffusers_fast.pipelines.latents import pack_latents, seeded_step_noise
    from ppdiffusers_fast.schedulers.samplers import few_step_sampler

    folder = Path(args.teacher)
    demo = read_demo_config(folder)
    teacher = DemoTeacher.from_folder(folder)
    classifier = load_classifier(folder / CLASSIFIER_WEIGHTS_NAME, demo["resolution"])
    metric = build_metric(teacher, classifier, folder, demo, args.reference_cache)
    sampling, sigmas = load_student(teacher, args.lora, "student", args.scale)
    labels, seeds = metric.measure_seeds.eval_set().labels_and_seeds
    steps = len(sigmas) - 1
    predictions = [[] for _ in range(steps)]
    channels, side = teacher.transformer.config.in_channels // 4, teacher.latent_size
    for start in range(0, len(labels), 100):
        batch_labels, batch_seeds = labels[start:start + 100], list(seeds[start:start + 100])
        sequence, pooled = teacher.prompts.take(np.asarray(batch_labels))

        def velocity(x, s):
            with use_adapters(teacher.transformer, "student"):
                return teacher.transformer(x, sequence, pooled, s, teacher.img_ids, teacher.txt_ids, None,
                                           return_dict=False)[0]

        def step_noise(i, shape):
            return pack_latents(seeded_step_noise(batch_seeds, i, [channels, side, side]))

        def keep(info):
            predictions[info["i"]].append(teacher.decode(info["denoised"]))

        with paddle.no_grad():
            few_step_sampler(sampling, step_noise)(velocity, teacher.initial_noise(batch_seeds), sigmas,
                                                   callback=keep)
    reference_trace = float(np.trace(np.cov(metric.reference.features.T)))
    print(f"{args.lora}: {steps} steps, sampler {sampling.get('sampler', 'euler')}, levels "
          f"{[round(float(s), 4) for s in np.asarray(sigmas)]}")
    for k in range(steps):
        measured = MeasuredSet.from_images(classifier, np.concatenate(predictions[k]), labels)
        row = metric.row(measured)
        trace = float(np.trace(np.cov(measured.features.T)))
        print(f"step {k + 1} (from t = {float(sigmas[k]):.3f}): FID {row['fid_disjoint']:.2f}, adherence "
              f"{100 * row['adherence']:.1f}%, feature trace {trace:.0f} (reference {reference_trace:.0f})")


if __name__ == "__main__":
    main()
