"""Distil the demo teacher into a 4-step LoRA student through the real training entry point.

Two stages:

1. :func:`build_latent_cache`: the teacher's training digits (``data.load_split``, the split of the folder's
   ``demo_config.json``) encoded with the folder's VAE, and their prompts with the folder's CLIP and T5 encoders,
   written as one precomputed-latent safetensors file (the layout ``training.batches.load_latent_file`` reads)::

       latents                      [N, 16, h, w]   posterior means, (z - shift_factor) * scaling_factor
       prompt_embeds                [N, T, D]       T5 states of "a handwritten digit <label>"
       pooled_prompt_embeds         [N, P]          CLIP pooled output
       uncond_prompt_embeds         [1, T, D]       the empty prompt (the teacher's CFG negative)
       uncond_pooled_prompt_embeds  [1, P]

2. :func:`distill`: the command line of ``examples/flux_lightning/train_flux_lightning_lora.py``
   (:func:`training_argv`: the reference recipe's flags scaled to the demo) parsed by ``training.config`` and run
   by ``training.launch.run_training``: checkpoints every ``checkpointing_steps``, ``--resume_from_checkpoint
   latest``, and the exported LoRA carries its sampling settings.

The recipe (:class:`DemoRecipe`) keeps the reference's structure (Huber consistency loss, K = 4 phases, the
teacher's guidance in the solver, adversarial heads on every block, DMD with the student as fake score,
reflow) with the sizes and rates of a 0.5M-parameter model trained for minutes: rank 16, learning rate 3e-3
(cosine decay) instead of 5e-6, N = 32 grid steps (8 per phase) instead of 100, batch 32, 1000 steps.
PCM's target is the teacher's Euler solution on the N-grid, so the student inherits the teacher's N-step Euler
error: on the demo the teacher's 16 Euler steps leave an excess FID of 0.25 over the noise floor and 32 steps 0.00
(docs/demo_ablation.md), and N = 32 costs no more per training step than N = 16 (one teacher step per grid step).
The LoRA covers the ``extended`` targets (``models.lora.TARGET_MODULE_PRESETS``): besides the reference's
attention and MLP layers, the single blocks' MLP and output projections and the adaLN modulation linears through
which the timestep reaches every block. On the demo this cut the student's FID against the teacher's 50 steps
from 3.44 to 1.01 (PCM, 1200 steps, 1000 images; the teacher's own 4 steps: 4.17).
"""
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np

from ppdiffusers_fast.models.safetensors_io import save_file
from .config import DEMO_MODEL_DIR, DemoSplit
from .teacher import DemoTeacher, read_demo_config

__all__ = ["DemoRecipe", "METHOD_RECIPES", "recipe_for", "build_latent_cache", "training_argv", "distill",
           "lora_file_name", "CACHE_NAME"]

CACHE_NAME = "latents.safetensors"
LORA_FILES = {"pcm": "pcm_lora.safetensors", "flux_lightning": "flux_lightning_lora.safetensors",
              "dmd2": "dmd2_lora.safetensors"}


@dataclass
class DemoRecipe:
    """Training flags of one demo distillation run (names as the training entry point's flags)."""

    method: str = "flux_lightning"
    max_train_steps: int = 1000
    train_batch_size: int = 32
    learning_rate: float = 3e-3
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 20
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_target_modules: str = "extended"
    num_euler_timesteps: int = 32  # N; the phase edges (the K sampling sigmas) are the same as with N = 16
    multiphase: int = 4
    loss_type: Optional[str] = "huber"  # PCM's consistency loss (pcm, flux_lightning)
    huber_c: Optional[float] = 0.001
    adam_weight_decay: float = 1e-3
    checkpointing_steps: int = 300
    checkpoints_total_limit: int = 2
    # flux_lightning parts (None: the flag is not passed, so the entry point's default applies)
    adv_weight: Optional[float] = 0.1
    adv_lr: Optional[float] = 1e-4
    adv_head_channels: Optional[int] = 32
    adv_alternate: Optional[bool] = False  # the demo's figures update generator and heads at every step
    use_dmd_loss: Optional[bool] = True
    dmd_weight: Optional[float] = 0.01
    apply_reflow_loss: Optional[bool] = True
    reflow_loss_weight: Optional[float] = 0.01
    dmd_placement: Optional[str] = None
    # dmd2 / adapter fake score
    dmd_fake_score: Optional[str] = None
    dmd_fake_score_updates: Optional[int] = None
    dmd_fake_score_lr: Optional[float] = None
    dmd_fake_score_rank: Optional[int] = None
    dmd2_gan_weight: Optional[float] = None
    dmd2_fake_score_per_step: Optional[bool] = None
    dmd2_sampler: Optional[str] = None
    dmd2_ema_decay: Optional[float] = None
    extra_flags: List[str] = field(default_factory=list)

    def flags(self) -> List[str]:
        """The recipe as command-line flags (booleans as ``--name`` / ``--no_name``)."""
        out = []
        for name, value in asdict(self).items():
            if name in ("method", "extra_flags") or value is None:
                continue
            if isinstance(value, bool):
                out.append(f"--{name}" if value else f"--no_{name}")
            else:
                out += [f"--{name}", str(value)]
        return out + list(self.extra_flags)


_PCM_ONLY = dict(adv_weight=None, adv_lr=None, adv_head_channels=None, adv_alternate=None, use_dmd_loss=None,
                 dmd_weight=None, apply_reflow_loss=None, reflow_loss_weight=None)

# The ablation's rows: one recipe per method variant, all with the same data, seeds and step budget.
METHOD_RECIPES: Dict[str, DemoRecipe] = {
    "flux_lightning": DemoRecipe(),
    "pcm": DemoRecipe(method="pcm", **_PCM_ONLY),
    "pcm_adv": DemoRecipe(use_dmd_loss=False, apply_reflow_loss=False, dmd_weight=None, reflow_loss_weight=None),
    "pcm_adv_dmd": DemoRecipe(apply_reflow_loss=False, reflow_loss_weight=None),
    # the DMD placement rows of docs/demo_ablation.md were measured on the N = 16 grid
    "pcm_dmd_phase_end": DemoRecipe(adv_weight=0.0, adv_lr=None, adv_head_channels=None, apply_reflow_loss=False,
                                    reflow_loss_weight=None, dmd_placement="phase_end", num_euler_timesteps=16),
    "pcm_dmd_student_x0": DemoRecipe(adv_weight=0.0, adv_lr=None, adv_head_channels=None, apply_reflow_loss=False,
                                     reflow_loss_weight=None, dmd_placement="student_x0", num_euler_timesteps=16),
    "flux_lightning_phase_end": DemoRecipe(dmd_placement="phase_end"),
    "flux_lightning_student_x0": DemoRecipe(dmd_placement="student_x0"),
    # DMD2 (docs/demo_ablation.md, "DMD2"): one fake-score adapter per generator step (with one shared fake score
    # the later steps' samples were judged against a mixture with the blurrier early steps' and got worse than the
    # step before them) of rank 64 (more than rank 16 can track), 5 fake-score updates per generator update, Euler
    # jumps between the generator's steps; checkpoints every 250 steps for the training curves; level grid N = 16.
    "dmd2": DemoRecipe(method="dmd2", num_euler_timesteps=16, loss_type=None, huber_c=None, adv_weight=None,
                       adv_alternate=None, use_dmd_loss=None,
                       dmd_weight=None, apply_reflow_loss=None, reflow_loss_weight=None, dmd_fake_score="adapter",
                       dmd_fake_score_updates=5, dmd2_gan_weight=5e-3, dmd2_fake_score_per_step=True,
                       dmd_fake_score_rank=64, checkpointing_steps=250, checkpoints_total_limit=25),
}
# DMD2 settings compared on the demo (docs/demo_ablation.md, "DMD2"). The 150-step runs (checkpoints every 50):
# one shared fake score with 5 fake-score updates per generator update, or a generator update every step with a
# 3.3x faster fake score. The 600-step runs (checkpoints every 100): one shared fake score, alone, with the
# re-noising sampler or with a 3x lower generator lr; per-step fake scores, alone, with the re-noising sampler, a
# 3.3x faster fake score or fake scores of rank 64.
METHOD_RECIPES["dmd2_u5"] = replace(METHOD_RECIPES["dmd2"], dmd2_fake_score_per_step=False, checkpointing_steps=50,
                                    checkpoints_total_limit=10, dmd_fake_score_rank=None)
METHOD_RECIPES["dmd2_u1_fake_lr_1e-2"] = replace(METHOD_RECIPES["dmd2_u5"], dmd_fake_score_updates=1,
                                                 dmd_fake_score_lr=1e-2)
_EVERY_100 = dict(checkpointing_steps=100, checkpoints_total_limit=25, dmd_fake_score_rank=None)
METHOD_RECIPES["dmd2_shared"] = replace(METHOD_RECIPES["dmd2"], dmd2_fake_score_per_step=False, **_EVERY_100)
METHOD_RECIPES["dmd2_shared_renoise"] = replace(METHOD_RECIPES["dmd2_shared"], dmd2_sampler="renoise")
METHOD_RECIPES["dmd2_shared_gen_lr_1e-3"] = replace(METHOD_RECIPES["dmd2_shared"], learning_rate=1e-3,
                                                    dmd_fake_score_lr=3e-3)
METHOD_RECIPES["dmd2_per_step"] = replace(METHOD_RECIPES["dmd2"], **_EVERY_100)
METHOD_RECIPES["dmd2_renoise"] = replace(METHOD_RECIPES["dmd2_per_step"], dmd2_sampler="renoise")
METHOD_RECIPES["dmd2_fake_lr_1e-2"] = replace(METHOD_RECIPES["dmd2_per_step"], dmd_fake_score_lr=1e-2)
METHOD_RECIPES["dmd2_fake_rank_64"] = replace(METHOD_RECIPES["dmd2_per_step"], dmd_fake_score_rank=64)
METHOD_RECIPES["dmd2_ema"] = replace(METHOD_RECIPES["dmd2_per_step"], dmd2_ema_decay=0.95)
# The best 4-step student on the demo (docs/demo_ablation.md): PCM alone, twice the demo's training steps.
METHOD_RECIPES["pcm_2000"] = replace(METHOD_RECIPES["pcm"], max_train_steps=2000)
# The earlier N = 16 grid, kept to reproduce the rows measured with it (docs/demo_ablation.md).
METHOD_RECIPES["pcm_n16"] = replace(METHOD_RECIPES["pcm"], num_euler_timesteps=16)
METHOD_RECIPES["flux_lightning_n16"] = replace(METHOD_RECIPES["flux_lightning"], num_euler_timesteps=16)


def recipe_for(name: str, **overrides) -> DemoRecipe:
    """The recipe of ablation row ``name`` (a key of ``METHOD_RECIPES``) with fields replaced."""
    if name not in METHOD_RECIPES:
        raise ValueError(f"unknown demo recipe {name!r}; choose one of {sorted(METHOD_RECIPES)}")
    return replace(METHOD_RECIPES[name], **{k: v for k, v in overrides.items() if v is not None})


def lora_file_name(method: str) -> str:
    return LORA_FILES[method]


def build_latent_cache(path: Union[str, Path], teacher: Optional[DemoTeacher] = None,
                       folder: Union[str, Path] = DEMO_MODEL_DIR, max_images: Optional[int] = None) -> Path:
    """Encode the teacher's training digits and prompts into the precomputed-latent file ``path``.

    Args:
        teacher: an already loaded :class:`DemoTeacher` (else loaded from ``folder``).
        max_images: keep only the first ``max_images`` digits (tests).
    Returns the written file.
    """
    from .data import load_split
    from .vae_training import encode_posterior

    folder = Path(folder)
    demo = read_demo_config(folder)
    teacher = teacher or DemoTeacher.from_folder(folder)
    split_fields = {k: v for k, v in demo.get("split", {}).items() if k in DemoSplit.__dataclass_fields__}
    digits = load_split(demo["resolution"], DemoSplit(**split_fields))["teacher_train"]
    if max_images is not None:
        digits = digits.subset(np.arange(min(max_images, len(digits))))
    means, _ = encode_posterior(teacher.vae, digits.images)
    config = teacher.vae.config
    latents = ((means - config.shift_factor) * config.scaling_factor).astype(np.float32)
    sequence = teacher.prompts.sequence.numpy().astype(np.float32)  # [11, T, D]: digits 0-9, then ""
    pooled = teacher.prompts.pooled.numpy().astype(np.float32)
    labels = digits.labels
    tensors = {
        "latents": (latents, "F32"),
        "prompt_embeds": (sequence[labels], "F32"),
        "pooled_prompt_embeds": (pooled[labels], "F32"),
        "uncond_prompt_embeds": (sequence[-1:], "F32"),
        "uncond_pooled_prompt_embeds": (pooled[-1:], "F32"),
        "labels": (labels.astype(np.int64), "I64"),
    }
    path = Path(path)
    save_file(tensors, path, metadata={"source": str(folder), "images": str(len(labels))})
    return path


def training_argv(recipe: DemoRecipe, output_dir: Union[str, Path], data_path: Union[str, Path],
                  folder: Union[str, Path] = DEMO_MODEL_DIR, seed: int = 0) -> List[str]:
    """The full command line of the training entry point for ``recipe`` on the demo folder."""
    demo = read_demo_config(folder)
    return [
        "--method", recipe.method, "--pretrained_teacher_model", str(folder), "--data_path", str(data_path),
        "--output_dir", str(output_dir), "--teacher_guidance", "cfg" if demo["guidance"] == "true_cfg" else "auto",
        "--guidance_scale", str(demo["guidance_scale"]), "--resolution", str(demo["resolution"]),
        "--max_sequence_length", str(demo["max_sequence_length"]), "--mixed_precision", "no",
        "--no_gradient_checkpointing", "--dataloader_num_workers", "0", "--validation_steps", "0",
        "--report_to", "none", "--resume_from_checkpoint", "latest", "--seed", str(seed),
    ] + recipe.flags()


def distill(recipe: DemoRecipe, output_dir: Union[str, Path], folder: Union[str, Path] = DEMO_MODEL_DIR,
            seed: int = 0, data_path: Optional[Union[str, Path]] = None, teacher: Optional[DemoTeacher] = None,
            max_images: Optional[int] = None, log=print) -> Path:
    """Train ``recipe`` with the training entry point; returns the exported student LoRA file.

    The latent cache is built once in ``output_dir/latents.safetensors`` (kept, so a resumed run reuses it).
    Re-running with the same ``output_dir`` resumes from the newest checkpoint there.
    """
    from ppdiffusers_fast.training.config import config_from_args
    from ppdiffusers_fast.training.launch import run_training

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if data_path is None:
        data_path = output_dir / CACHE_NAME
        if not data_path.is_file():
            log(f"encoding the teacher's training digits into {data_path}")
            build_latent_cache(data_path, teacher, folder, max_images)
    argv = training_argv(recipe, output_dir, data_path, folder, seed)
    log("training: python examples/flux_lightning/train_flux_lightning_lora.py " + " ".join(argv))
    result = run_training(config_from_args(argv))
    lora = output_dir / lora_file_name(recipe.method)
    if not lora.is_file():
        raise FileNotFoundError(f"training finished at step {result.step} but wrote no LoRA at {lora}")
    return lora


def copy_lora(source: Union[str, Path], target: Union[str, Path]) -> Path:
    """Copy a LoRA file atomically (temporary name in the target folder, then rename)."""
    target = Path(target)
    temp = target.with_name(target.name + ".tmp")
    shutil.copyfile(source, temp)
    temp.replace(target)
    return target
