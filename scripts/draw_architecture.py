"""Draw docs/architecture.png: the package's layers and the data flow of one training step and one generation.

    python scripts/draw_architecture.py [--output docs/architecture.png]

The picture is data (``LAYERS``, ``TRAINING_STEP``, ``GENERATION`` below) drawn by two small functions; edit the
data when a module moves and rerun. docs/ARCHITECTURE.md explains it in words.
"""
import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

# bottom to top: each layer imports only from the layers below it
LAYERS = [
    ("models", "#dbe9f6", [
        ("models/", "transformer_flux  flux_layers  flux_embeddings  discriminator\n"
                    "lora  lora_io  weights  safetensors_io  flux_folder  single_file"),
    ]),
    ("noise math and losses", "#e3f1df", [
        ("schedules.py", "time shift  grid  phases\nre-noising  CFG  Euler step"),
        ("schedulers/", "samplers.sample_euler\nFlowMatchEulerDiscreteScheduler"),
        ("losses/", "consistency  flow matching\nGAN  DMD  reflow (pure)"),
    ]),
    ("methods", "#fdf0d5", [
        ("methods/", "base (DistillationMethod, FewStepSchedule, LatentBatch)  denoiser (FluxDenoiser,\n"
                     "teacher_velocity)  pcm  adversarial  distribution_matching  reflow  flux_lightning  dmd2  registry"),
    ]),
    ("training and pipelines", "#f6e0e0", [
        ("data/", "sources  cache  readers\nLAION filter  tar shards"),
        ("training/", "config  launch  trainer\ncheckpoint  optim  validation"),
        ("pipelines/", "FluxPipeline  latents\ntext_encoding  model_files"),
        ("inference/ evaluation/", "compile (to_static, predictor)\ngenerate_cli   FID, CLIP score"),
    ]),
    ("command lines", "#e8e1f3", [
        ("examples/flux_lightning/", "train_flux_lightning_lora.py\ntext_to_image_generation_flux_lightning.py\n"
                                     "run_demo.py  demo/ (CPU digits demo)"),
        ("scripts/", "train_flux_lightning.sh  evaluate_coco10k.py\nfilter_laion_aesv2.py  benchmarks"),
    ]),
]

TRAINING_STEP = [
    ("data.sources.build_training_data", "latent cache, latent file, tar shards, image folder, base64 lines -> LatentBatch\n"
                                         "latents [B, L, 64], FluxCondition (T5 [B, T, 4096], CLIP [B, 768])"),
    ("method.update_schedule(step)", "groups stepped now: generator, discriminator, fake_score"),
    ("method.train_step(batch, step)", "x_i = (1 - s) x0 + s eps;  student / teacher / fake score = one frozen\n"
                                       "FluxDenoiser with LoRA adapters switched by use_adapters"),
    ("losses/", "L_pcm + w L_G + w L_dmd + w L_reflow  ->  StepResult per group"),
    ("trainer", "backward into each group only, all-reduce, clip, AdamW per group,\n"
                "after_update (EMA), VisualDL, atomic checkpoint"),
    ("method.export(output_dir)", "student LoRA .safetensors + sampling metadata (K, N, guidance)"),
]

GENERATION = [
    ("FluxPipeline.from_pretrained", "models.flux_folder (or single files): tokenizers, CLIP + T5, transformer,\n"
                                     "VAE, scheduler config; strict safetensors loading"),
    ("load_lora (+ fuse_lora)", "each LoRA file read once, live at its own scale (student, styles);\n"
                                "the student's metadata sets steps and guidance"),
    ("encode_prompt + seeded_noise", "CLIP pooled [B, 768], T5 [B, T, 4096]; packed noise [B, L, 64]"),
    ("few_step_sigmas", "K + 1 phase-edge levels at this resolution's shift"),
    ("samplers.sample_euler", "v = transformer (or compiled runner); true CFG via\n"
                              "schedules.classifier_free_guidance; x += (s' - s) v"),
    ("latents.decode_latents", "unpack, / scaling + shift, VAE decode -> images [B, H, W, 3]"),
]


def draw_layers(ax):
    """The layer stack, models at the bottom, with arrows for "imports from below"."""
    ax.set_xlim(0, 10)
    ax.set_ylim(0, len(LAYERS) * 2)
    ax.axis("off")
    ax.set_title("Layers (each imports only from those below)", fontsize=12, loc="left")
    for row, (name, colour, boxes) in enumerate(LAYERS):
        y = row * 2 + 0.15
        ax.add_patch(FancyBboxPatch((0.05, y), 9.9, 1.7, boxstyle="round,pad=0.02", facecolor=colour,
                                    edgecolor="#888888", linewidth=0.8))
        ax.text(0.15, y + 1.52, name, fontsize=10, fontweight="bold", va="top")
        width = 9.7 / len(boxes)
        for col, (title, body) in enumerate(boxes):
            x = 0.15 + col * width
            ax.add_patch(FancyBboxPatch((x + 0.05, y + 0.1), width - 0.1, 1.1, boxstyle="round,pad=0.02",
                                        facecolor="white", edgecolor="#555555", linewidth=0.6))
            ax.text(x + width / 2, y + 1.05, title, ha="center", va="top", fontsize=8.5, fontweight="bold",
                    family="monospace")
            ax.text(x + width / 2, y + 0.75, body, ha="center", va="top", fontsize=6.6, family="monospace")
        if row:
            ax.add_patch(FancyArrowPatch((9.6, y + 0.05), (9.6, y - 0.25), arrowstyle="-|>", mutation_scale=10,
                                         color="#444444"))


def draw_flow(ax, title, steps):
    """A vertical chain of boxes, one per step, top to bottom."""
    ax.set_xlim(0, 10)
    ax.set_ylim(0, len(steps) * 1.25)
    ax.axis("off")
    ax.set_title(title, fontsize=12, loc="left")
    top = len(steps) * 1.25
    for i, (name, detail) in enumerate(steps):
        y = top - (i + 1) * 1.25 + 0.2
        ax.add_patch(FancyBboxPatch((0.1, y - 0.05), 9.8, 1.0, boxstyle="round,pad=0.02", facecolor="#f4f4f4",
                                    edgecolor="#555555", linewidth=0.7))
        ax.text(0.25, y + 0.85, name, fontsize=8.5, fontweight="bold", va="top", family="monospace")
        ax.text(0.25, y + 0.55, detail, fontsize=7, va="top", family="monospace")
        if i + 1 < len(steps):
            ax.add_patch(FancyArrowPatch((5.0, y - 0.07), (5.0, y - 0.28), arrowstyle="-|>", mutation_scale=10,
                                         color="#444444"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(Path(__file__).resolve().parents[1] / "docs" / "architecture.png"))
    args = parser.parse_args(argv)
    figure = plt.figure(figsize=(17, 10))
    grid = figure.add_gridspec(2, 2, width_ratios=[1.05, 1], hspace=0.12, wspace=0.04)
    draw_layers(figure.add_subplot(grid[:, 0]))
    draw_flow(figure.add_subplot(grid[0, 1]), "One training step (training/trainer.py)", TRAINING_STEP)
    draw_flow(figure.add_subplot(grid[1, 1]), "One generation (pipelines/pipeline_flux.py)", GENERATION)
    figure.savefig(args.output, dpi=100, bbox_inches="tight")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
