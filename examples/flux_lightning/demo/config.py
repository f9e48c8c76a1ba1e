"""Settings of the miniature FLUX demo: image size, tiny model shapes, prompts and teacher training.

The demo model is a FLUX.1-dev-layout folder (``demo_model/`` next to this package) whose components have
the FLUX architectures at toy sizes. Numbers here are the ones the committed folder was trained with; its
``demo_config.json`` records the values a user of the folder needs (resolution, text length, guidance).
"""
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Tuple

DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "demo_model"  # examples/flux_lightning/demo_model
QUICK_START_OUTPUT_DIR = Path("outputs") / "demo"  # relative to the working directory (the repository root)
STUDENT_LORA_NAME = "student_lora.safetensors"  # the quick start's 4-step student, in its output folder
DEMO_CONFIG_NAME = "demo_config.json"
CLASSIFIER_WEIGHTS_NAME = "digit_classifier.safetensors"
TRAIN_LOG_NAME = "train_log.txt"
SAMPLES_GRID_NAME = "teacher_samples.png"

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPT_TEMPLATE = "a handwritten digit {}"
EMPTY_PROMPT = ""  # the unconditional prompt of classifier-free guidance (caption dropout target)


def digit_prompt(label: int) -> str:
    """``"a handwritten digit seven"`` for label 7."""
    if not 0 <= int(label) <= 9:
        raise ValueError(f"digit label must be in 0..9, got {label}")
    return PROMPT_TEMPLATE.format(DIGIT_WORDS[int(label)])


def all_prompts() -> Tuple[str, ...]:
    """The 10 digit prompts followed by the empty prompt (index 10)."""
    return tuple(digit_prompt(d) for d in range(10)) + (EMPTY_PROMPT,)


@dataclass
class DemoModelConfig:
    """Shapes of the tiny FLUX components (FLUX.1-dev's own values in brackets)."""

    resolution: int = 32  # image side in pixels [1024]
    vae_block_out_channels: Tuple[int, ...] = (8, 16, 32)  # 3 levels: 4x downsampling [(128, 256, 512, 512): 8x]
    vae_norm_num_groups: int = 4  # GroupNorm groups of the VAE [32]
    latent_channels: int = 16  # as FLUX.1
    text_hidden_size: int = 64  # CLIP width = pooled_projection_dim [768]
    t5_d_model: int = 64  # T5 width = joint_attention_dim [4096]
    text_layers: int = 2  # layers of each text encoder [12 / 24]
    text_heads: int = 4
    max_sequence_length: int = 8  # T5 tokens fed to the transformer [512]
    num_layers: int = 2  # double-stream blocks [19]
    num_single_layers: int = 2  # single-stream blocks [38]
    num_attention_heads: int = 4  # [24]
    attention_head_dim: int = 16  # inner dim 64 [128 -> 3072]
    axes_dims_rope: Tuple[int, int, int] = (4, 6, 6)  # sums to attention_head_dim [(16, 56, 56)]

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae_scale_factor

    @property
    def image_tokens(self) -> int:
        return (self.latent_size // 2) ** 2


@dataclass
class TeacherTrainingConfig:
    """Optimisation settings of ``train_teacher`` (one fixed seed for data split, init and noise)."""

    seed: int = 0
    vae_steps: int = 300  # AdamW steps of the VAE (reconstruction + KL)
    vae_batch_size: int = 32
    vae_learning_rate: float = 2e-3
    vae_kl_weight: float = 1e-3  # weight of the mean per-element KL against the mean squared error
    transformer_steps: int = 2000  # AdamW steps of the flow-matching transformer
    transformer_batch_size: int = 64
    transformer_learning_rate: float = 2e-3
    transformer_warmup_steps: int = 50
    ema_decay: float = 0.995  # the saved teacher is the EMA of the trained weights
    caption_dropout: float = 0.1  # share of training prompts replaced by the empty prompt
    logit_normal_std: float = 1.0  # s = shift(sigmoid(n)), n ~ N(0, std^2), FLUX's training distribution
    classifier_epochs: int = 60
    classifier_learning_rate: float = 3e-3
    guidance_scale: float = 3.0  # true CFG scale of the teacher (empty negative prompt)
    eval_images_per_digit: int = 10  # adherence is measured on 10 x this many samples
    grid_images_per_digit: int = 8  # columns of teacher_samples.png
    eval_seed: int = 1000  # noise seeds of evaluation samples: eval_seed + i
    eval_step_counts: Tuple[int, ...] = (1, 2, 4, 8)  # Euler step counts compared with 50 steps in the log

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DemoSplit:
    """The fixed split of scikit-learn's 1797 digits: one permutation drawn with ``seed``, then consecutive parts.

    The teacher never sees the classifier's images, so the classifier judges the teacher on digits it learned
    from other writers' samples.
    """

    seed: int = 0
    teacher_train: int = 1197
    classifier_train: int = 400
    classifier_test: int = 200
