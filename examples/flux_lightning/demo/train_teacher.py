"""Build the demo teacher folder end to end: tokenizers, frozen text encoders, VAE, transformer, classifier.

Stages (one fixed seed; the log lists every loss, time and metric):

1. tokenizers from the prompts' words; random CLIP / T5 text encoders (frozen), checked to give the
   11 prompts (10 digits + empty) distinct embeddings;
2. the VAE on the teacher's training digits (``vae_training.py``), its shift / scaling factors from the
   trained latents;
3. the transformer with the rectified-flow loss on cached latents and caption dropout (``flow_training.py``);
4. the digit classifier on held-out digits (``classifier.py``), accuracy on its test split;
5. reloading the written folder (PyTorch-layout safetensors, as FluxPipeline reads it) and measuring the
   teacher: adherence at 50 and at 4 Euler steps with true CFG, FID of 4-step against 50-step samples and
   the 50-step noise floor (other seeds); a grid PNG of 50-step / 4-step samples with the same seeds.

Everything is written to ``<output_dir>.partial`` and renamed to ``output_dir`` when complete.
"""
import json
import os
import platform
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import paddle

from ppdiffusers_fast import schedules
from . import components
from .classifier import FEATURE_DIM, accuracy, save_classifier, train_classifier
from .config import (CLASSIFIER_WEIGHTS_NAME, DEMO_CONFIG_NAME, EMPTY_PROMPT, PROMPT_TEMPLATE, SAMPLES_GRID_NAME,
                     TRAIN_LOG_NAME, DemoModelConfig, DemoSplit, TeacherTrainingConfig, all_prompts)
from .data import load_split
from .flow_training import CachedLatents, train_transformer
from .metrics import adherence, eval_labels_and_seeds, feature_fid, save_digit_grid
from .teacher import DemoTeacher, encode_prompt_table
from .tokenizers import write_clip_tokenizer, write_t5_tokenizer
from .vae_training import encode_posterior, latent_statistics, train_vae

__all__ = ["RunLog", "train_demo_teacher", "prompt_embedding_distances", "TEST_BATCH"]

# The small fixed batch of tests/demo/test_demo_teacher.py: 2 images per digit, seeds 7000 + i.
TEST_BATCH = {"images_per_digit": 2, "first_seed": 7000, "num_steps": 50}


class RunLog:
    """Append timestamped lines to a log file and echo them (through tqdm, so bars stay intact)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("", encoding="utf-8")
        self.start = time.time()

    def __call__(self, message: str) -> None:
        from tqdm.auto import tqdm

        line = f"[{time.time() - self.start:7.1f}s] {message}"
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
        tqdm.write(line)


def prompt_embedding_distances(pooled: np.ndarray, sequence: np.ndarray) -> dict:
    """Smallest pairwise L2 distance between the prompts' pooled and flattened sequence embeddings."""
    def smallest(x):
        x = x.reshape(len(x), -1).astype(np.float64)
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return float(d[~np.eye(len(x), dtype=bool)].min())

    return {"pooled_min_distance": smallest(pooled), "sequence_min_distance": smallest(sequence)}


def _folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _replace_folder(stage: Path, target: Path) -> None:
    backup = target.with_name(target.name + ".old")
    if backup.exists():
        shutil.rmtree(backup)
    if target.exists():
        target.rename(backup)
    stage.rename(target)
    if backup.exists():
        shutil.rmtree(backup)


def train_demo_teacher(output_dir, model_cfg: DemoModelConfig = DemoModelConfig(),
                       train_cfg: TeacherTrainingConfig = TeacherTrainingConfig(), split: DemoSplit = DemoSplit(),
                       command: Optional[str] = None) -> dict:
    """Train every component, write the FLUX.1-dev-layout folder ``output_dir`` and return the measured figures."""
    output_dir = Path(output_dir)
    stage = output_dir.with_name(output_dir.name + ".partial")
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    log = RunLog(stage / TRAIN_LOG_NAME)
    log(f"command: {command or '(library call)'}")
    log(f"seed {train_cfg.seed}; paddle {paddle.__version__}; python {platform.python_version()}; "
        f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"load average at start {os.getloadavg()[0]:.2f}")
    log(f"model config: {json.dumps(asdict(model_cfg))}")
    log(f"training config: {json.dumps(train_cfg.to_dict())}")
    log(f"split: {json.dumps(asdict(split))}")
    timings = {}
    paddle.seed(train_cfg.seed)

    # 1. tokenizers and frozen text encoders ------------------------------------------------------------
    t0 = time.time()
    prompts = all_prompts()
    clip_vocab = write_clip_tokenizer(stage / "tokenizer", prompts)
    t5_vocab = write_t5_tokenizer(stage / "tokenizer_2", prompts)
    clip_cfg, t5_cfg = components.clip_text_config(clip_vocab, model_cfg), components.t5_config(t5_vocab, model_cfg)
    clip, t5 = components.build_text_encoders(clip_cfg, t5_cfg)
    components.save_torch_layout(clip, stage / "text_encoder" / "model.safetensors", clip_cfg)
    components.save_torch_layout(t5, stage / "text_encoder_2" / "model.safetensors", t5_cfg)
    components.write_model_index(stage)
    components.write_scheduler_config(stage)
    from ppdiffusers_fast.models import flux_folder

    table = encode_prompt_table(flux_folder.load_tokenizers(stage), (clip, t5), model_cfg.max_sequence_length)
    distances = prompt_embedding_distances(table.pooled.numpy(), table.sequence.numpy())
    log(f"text encoders: CLIP {components.count_parameters(clip):,} parameters (vocab {clip_vocab}), "
        f"T5 {components.count_parameters(t5):,} parameters (vocab {t5_vocab}); 11 prompt embeddings: "
        f"smallest pairwise distance pooled {distances['pooled_min_distance']:.4f}, "
        f"sequence {distances['sequence_min_distance']:.4f}")
    if min(distances.values()) <= 1e-3:
        raise RuntimeError(f"two prompts have (nearly) the same embedding: {distances}")
    timings["text_encoders_s"] = time.time() - t0

    # 2. VAE ------------------------------------------------------------------------------------------------
    data = load_split(model_cfg.resolution, split)
    train_images, train_labels = data["teacher_train"].images, data["teacher_train"].labels
    t0 = time.time()
    vae = components.build_vae(model_cfg)
    log(f"VAE: {components.count_parameters(vae):,} parameters, latent {model_cfg.latent_channels}x"
        f"{model_cfg.latent_size}x{model_cfg.latent_size}, {model_cfg.image_tokens} packed tokens")
    vae_history = train_vae(vae, train_images, train_cfg.vae_steps, train_cfg.vae_batch_size,
                            train_cfg.vae_learning_rate, train_cfg.vae_kl_weight, train_cfg.seed, log=log)
    means, stds = encode_posterior(vae, train_images)
    shift_factor, scaling_factor = latent_statistics(means)
    vae.register_to_config(shift_factor=shift_factor, scaling_factor=scaling_factor)
    held_out = data["classifier_test"].images
    held_means, _ = encode_posterior(vae, held_out)
    with paddle.no_grad():
        reconstruction = vae.decode(paddle.to_tensor(held_means)).sample.numpy()
    vae_test_mse = float(np.mean((reconstruction - held_out) ** 2))
    components.save_torch_layout(vae, stage / "vae" / "diffusion_pytorch_model.safetensors",
                                 components.vae_config_json(vae))
    timings["vae_s"] = time.time() - t0
    log(f"VAE trained in {timings['vae_s']:.1f}s: final mse {vae_history[-1]['mse']:.5f}, held-out reconstruction "
        f"mse {vae_test_mse:.5f}; shift_factor {shift_factor:.6f}, scaling_factor {scaling_factor:.6f}")

    # 3. transformer ------------------------------------------------------------------------------------
    t0 = time.time()
    transformer = components.build_transformer(model_cfg)
    mu = schedules.resolution_mu(model_cfg.image_tokens)
    log(f"transformer: {components.count_parameters(transformer):,} parameters, {model_cfg.num_layers} double + "
        f"{model_cfg.num_single_layers} single blocks, inner dim "
        f"{model_cfg.num_attention_heads * model_cfg.attention_head_dim}; training levels shift(sigmoid(N(0, "
        f"{train_cfg.logit_normal_std}^2)); mu={mu:.4f})")
    latents = CachedLatents(means, stds, train_labels, shift_factor, scaling_factor)
    flow_history = train_transformer(transformer, latents, table, train_cfg.transformer_steps,
                                     train_cfg.transformer_batch_size, train_cfg.transformer_learning_rate,
                                     train_cfg.transformer_warmup_steps, train_cfg.caption_dropout, mu,
                                     train_cfg.logit_normal_std, train_cfg.ema_decay, train_cfg.seed,
                                     empty_prompt_index=len(prompts) - 1, log=log)
    components.save_torch_layout(transformer, stage / "transformer" / "diffusion_pytorch_model.safetensors",
                                 components.transformer_config_json(transformer))
    timings["transformer_s"] = time.time() - t0
    log(f"transformer trained in {timings['transformer_s']:.1f}s: last-50-step loss "
        f"{np.mean([h['loss'] for h in flow_history[-50:]]):.4f} (EMA weights saved)")

    # 4. classifier -------------------------------------------------------------------------------------
    t0 = time.time()
    cls_train, cls_test = data["classifier_train"], data["classifier_test"]
    classifier = train_classifier(cls_train.images, cls_train.labels, train_cfg.classifier_epochs,
                                  train_cfg.classifier_learning_rate, train_cfg.seed, log=log)
    test_accuracy = accuracy(classifier, cls_test.images, cls_test.labels)
    teacher_split_accuracy = accuracy(classifier, train_images, train_labels)
    save_classifier(classifier, stage / CLASSIFIER_WEIGHTS_NAME)
    timings["classifier_s"] = time.time() - t0
    log(f"classifier trained in {timings['classifier_s']:.1f}s on {len(cls_train)} held-out digits: test accuracy "
        f"{test_accuracy:.4f} ({len(cls_test)} digits); accuracy on the teacher's training digits "
        f"{teacher_split_accuracy:.4f}")

    # 5. reload the folder and evaluate the teacher -------------------------------------------------------
    demo = {
        "resolution": model_cfg.resolution, "height": model_cfg.resolution, "width": model_cfg.resolution,
        "max_sequence_length": model_cfg.max_sequence_length, "guidance": "true_cfg",
        "guidance_scale": train_cfg.guidance_scale, "negative_prompt": EMPTY_PROMPT,
        "prompt_template": PROMPT_TEMPLATE, "prompts": list(prompts[:10]), "image_tokens": model_cfg.image_tokens,
        "mu": mu, "split": asdict(split),
        "classifier": {"file": CLASSIFIER_WEIGHTS_NAME, "resolution": model_cfg.resolution,
                       "feature_dim": FEATURE_DIM, "layout": "paddle", "test_accuracy": test_accuracy,
                       "num_test_images": len(cls_test)},
    }
    components.write_json(stage / DEMO_CONFIG_NAME, demo)
    t0 = time.time()
    teacher = DemoTeacher.from_folder(stage)
    labels, seeds = eval_labels_and_seeds(train_cfg.eval_images_per_digit, train_cfg.eval_seed)
    images_50 = teacher.generate(labels, seeds, 50)
    images_4 = teacher.generate(labels, seeds, 4)
    other_seeds = [s + 10_000 for s in seeds]
    images_50_other = teacher.generate(labels, other_seeds, 50)
    test_labels, test_seeds = eval_labels_and_seeds(TEST_BATCH["images_per_digit"], TEST_BATCH["first_seed"])
    test_batch_adherence = adherence(classifier, teacher.generate(test_labels, test_seeds, TEST_BATCH["num_steps"]),
                                     test_labels)
    metrics = {
        "adherence_50_steps": adherence(classifier, images_50, labels),
        "adherence_4_steps": adherence(classifier, images_4, labels),
        "adherence_50_steps_other_seeds": adherence(classifier, images_50_other, labels),
        "fid_4_steps_vs_50_steps": feature_fid(classifier, images_4, images_50),
        "fid_50_steps_other_seeds_vs_50_steps": feature_fid(classifier, images_50_other, images_50),
        "fid_50_steps_vs_held_out_digits": feature_fid(classifier, images_50, held_out),
        "num_eval_images": len(labels), "eval_first_seed": train_cfg.eval_seed,
        "test_batch": dict(TEST_BATCH, adherence=test_batch_adherence),
    }
    by_steps = {}
    for steps in train_cfg.eval_step_counts:
        images_n = images_4 if steps == 4 else teacher.generate(labels, seeds, steps)
        by_steps[str(steps)] = {"adherence": adherence(classifier, images_n, labels),
                                "fid_vs_50_steps": feature_fid(classifier, images_n, images_50)}
    metrics["euler_steps_vs_50_steps"] = by_steps
    _, grid_seeds = eval_labels_and_seeds(train_cfg.grid_images_per_digit, train_cfg.eval_seed)
    grid_50 = np.concatenate([images_50[labels.index(d):labels.index(d) + train_cfg.grid_images_per_digit]
                              for d in range(10)])
    grid_4 = np.concatenate([images_4[labels.index(d):labels.index(d) + train_cfg.grid_images_per_digit]
                             for d in range(10)])
    save_digit_grid(stage / SAMPLES_GRID_NAME, [grid_50, grid_4], columns=train_cfg.grid_images_per_digit)
    timings["evaluation_s"] = time.time() - t0
    log(f"teacher (true CFG {train_cfg.guidance_scale}, empty negative prompt), {len(labels)} images "
        f"({train_cfg.eval_images_per_digit} per digit, seeds {seeds[0]}..{seeds[-1]}):")
    log(f"  adherence at 50 Euler steps {metrics['adherence_50_steps']:.3f} (other seeds "
        f"{metrics['adherence_50_steps_other_seeds']:.3f}); at 4 Euler steps {metrics['adherence_4_steps']:.3f}")
    log(f"  classifier-feature FID: 4 steps vs 50 steps {metrics['fid_4_steps_vs_50_steps']:.3f}; 50 steps other "
        f"seeds vs 50 steps (noise floor) {metrics['fid_50_steps_other_seeds_vs_50_steps']:.3f}; 50 steps vs "
        f"held-out real digits {metrics['fid_50_steps_vs_held_out_digits']:.3f}")
    log("  Euler steps: " + "; ".join(f"{n} -> adherence {v['adherence']:.3f}, FID vs 50 steps {v['fid_vs_50_steps']:.3f}"
                                      for n, v in by_steps.items()))
    log(f"  test batch ({TEST_BATCH}) adherence {test_batch_adherence:.3f}")
    log(f"grid {SAMPLES_GRID_NAME}: rows digits 0-9, left 50 Euler steps, right 4 Euler steps, same seeds "
        f"{grid_seeds[0]}.. per row (seed = {train_cfg.eval_seed} + 10 * digit + column)")

    demo["teacher_metrics"] = metrics
    demo["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    components.write_json(stage / DEMO_CONFIG_NAME, demo)
    total = time.time() - log.start
    log(f"timings: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()) + f"; total {total:.1f}s; "
        f"load average at end {os.getloadavg()[0]:.2f}")
    log(f"folder size {_folder_size(stage) / 1e6:.2f} MB")
    _replace_folder(stage, output_dir)
    return {"metrics": metrics, "timings": timings, "classifier_test_accuracy": test_accuracy,
            "total_s": total, "folder": str(output_dir)}
