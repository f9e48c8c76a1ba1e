"""Typed training configuration and its command line.

Every field of the dataclasses below is one command-line flag of the same name (``--lora_rank``);
booleans get ``--name`` / ``--no_name``. Defaults are the FLUX-Lightning reference run
(ALGORITHMS.md: FLUX.1-dev teacher, LoRA rank 32, lr 5e-6, AdamW weight decay 1e-3, Huber loss,
guidance 3.5, N = 100, K = 4, bf16, gradient checkpointing, batch 1 per device, 28,652 steps).
The method sections (``FewStepSchedule``, ``PCMConfig`` ...) live beside their methods and are composed here.
These sections are the only configuration: the trainer (``training.trainer.Trainer``), the optimizer
(``training.optim.OptimizerSettings.from_config``) and the LoRA shape (``ModelConfig.lora_config``) read them,
so every default is stated once, in the flag that declares it. ``train_config(**flags)`` builds one in code.

Flags that the reference script parses but this library does not implement are still parsed, so
that a reference command line gives a clear error naming the flag instead of "unrecognized
arguments" or, worse, being silently ignored (``REJECTED_REFERENCE_FLAGS``).

The resolved config is written as JSON beside every checkpoint (``config_to_dict``).
"""
import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence

from ..command_line import CommandLineParser
from ..config_fields import flag
from ..methods.adversarial import AdversarialConfig
from ..methods.base import FewStepSchedule
from ..methods.distribution_matching import DistributionMatchingConfig
from ..methods.dmd2 import DMD2Config
from ..methods.pcm import PCMConfig
from ..methods.reflow import ReflowConfig
from ..methods.registry import METHOD_IGNORES, METHOD_USES, METHODS
from ..models.lora import REFERENCE_TARGET_MODULES, LoraConfig, resolve_target_modules
from ..pipelines.model_files import FILE_HELP


@dataclass
class ModelConfig:
    pretrained_teacher_model: Optional[str] = flag(
        None, "FLUX folder in diffusers layout (transformer/ sub-folder or the transformer folder itself), or a "
        "Black Forest Labs / ComfyUI transformer file (flux1-dev.safetensors, fp8 included); "
        "the reference run used black-forest-labs/FLUX.1-dev")
    transformer_file: Optional[str] = flag(None, FILE_HELP["transformer"] + "; the four single-file flags go "
                                           "together, --pretrained_teacher_model then names the tokenizers' folder")
    vae_file: Optional[str] = flag(None, FILE_HELP["vae"])
    clip_l_file: Optional[str] = flag(None, FILE_HELP["clip_l"])
    t5_file: Optional[str] = flag(None, FILE_HELP["t5"])
    teacher_guidance: str = flag(
        "auto", "how the teacher applies guidance: embedded (FLUX.1-dev), cfg (two passes with an "
        "unconditional embedding), auto (embedded when the transformer has a guidance embedding)",
        choices=["auto", "embedded", "cfg"])
    lora_rank: int = flag(32, "LoRA rank r of every adapted Linear")
    lora_alpha: float = flag(8.0, "LoRA alpha; scale = alpha / r (8 / 32 = 0.25 as the reference's adapter)")
    lora_dropout: float = flag(0.0, "dropout on the LoRA input")
    lora_target_modules: str = flag(
        ",".join(REFERENCE_TARGET_MODULES),
        "comma-separated module-name suffixes that get LoRA (default: the reference's list), or a preset: "
        "reference (this list) or extended (+ the single blocks' proj_mlp / proj_out, the adaLN modulation "
        "linears and the output projection)")
    mixed_precision: str = flag("bf16", "no | fp16 | bf16; on CPU everything runs in fp32",
                                choices=["no", "fp16", "bf16"])
    fp16_opt_level: str = flag("O1", "AMP level: O1 (frozen base in low precision, trainable weights fp32) or "
                               "O2 (trainable weights low precision too, fp32 master weights in AdamW)",
                               choices=["O0", "O1", "O2"])
    gradient_checkpointing: bool = flag(True, "recompute every transformer block in the backward pass")

    def lora_config(self) -> LoraConfig:
        """The student's adapter shape (rank, alpha, dropout, resolved target list)."""
        return LoraConfig(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout,
                          target_modules=resolve_target_modules(self.lora_target_modules))


@dataclass
class DataConfig:
    data_path: Optional[str] = flag(None, "training data: a latent cache, a latent .safetensors file, tar shards, "
                                          "an image folder with .txt captions, or base64 lines (--file_list_path)")
    file_list_path: Optional[str] = flag(None, "text file listing the data files relative to --data_path")
    resolution: int = flag(1024, "training image size (square) in pixels")
    center_crop: bool = flag(False, "center crop instead of random crop after resizing")
    random_flip: bool = flag(False, "randomly flip training images horizontally")
    train_batch_size: int = flag(1, "batch size per device")
    dataloader_num_workers: int = flag(min(8, os.cpu_count() or 1),
                                       "data loading worker processes (0 = in the main process); default "
                                       "min(8, CPU count)")
    max_sequence_length: int = flag(512, "T5 prompt length in tokens")


@dataclass
class OptimConfig:
    learning_rate: float = flag(5e-6, "peak learning rate of the generator (student LoRA)")
    scale_lr: bool = flag(False, "multiply the learning rate by world size x accumulation x batch size")
    lr_scheduler: str = flag("constant", "learning-rate shape after warm-up",
                             choices=["constant", "constant_with_warmup", "linear", "cosine",
                                      "cosine_with_restarts", "polynomial"])
    lr_warmup_steps: int = flag(500, "linear warm-up steps (ignored by 'constant', as in diffusers)")
    lr_num_cycles: int = flag(1, "hard restarts of cosine_with_restarts")
    lr_power: float = flag(1.0, "power of the polynomial decay")
    adam_beta1: float = flag(0.9, "AdamW beta1")
    adam_beta2: float = flag(0.999, "AdamW beta2")
    adam_weight_decay: float = flag(1e-3, "AdamW decoupled weight decay")
    adam_epsilon: float = flag(1e-8, "AdamW epsilon")
    max_grad_norm: float = flag(1.0, "clip the global gradient norm of each parameter group (0 = off)")
    gradient_accumulation_steps: int = flag(1, "micro-batches per optimizer update")
    max_train_steps: Optional[int] = flag(28652, "optimizer updates in total (overrides --num_train_epochs)")
    num_train_epochs: int = flag(1, "epochs, used only when --max_train_steps is not given")


@dataclass
class RunConfig:
    method: str = flag("flux_lightning", "distillation method", choices=list(METHODS))
    output_dir: str = flag("outputs/lora_flux_lightning", "checkpoints, logs and the final LoRA go here")
    seed: Optional[int] = flag(453645634, "global seed (each rank adds its rank)")
    checkpointing_steps: int = flag(1000, "write a checkpoint every N optimizer updates (and at the end)")
    checkpoints_total_limit: Optional[int] = flag(30, "keep only the newest M checkpoints")
    resume_from_checkpoint: Optional[str] = flag(
        "latest", "'latest' (newest checkpoint in --output_dir, or a fresh start when there is none) or a path")
    logging_dir: str = flag("logs", "VisualDL folder, relative to --output_dir")
    report_to: str = flag("visualdl", "scalar/image logger", choices=["visualdl", "none"])
    tracker_project_name: str = flag("flux-lightning", "run name shown in VisualDL")
    validation_steps: int = flag(20000, "sample the fixed prompts every N updates (0 = never)")
    validation_prompt: str = flag("a photo of a cat sitting on a wooden table", "validation prompt(s), '|'-separated")
    num_validation_images: int = flag(4, "images per validation prompt")
    sample_batch_size: int = flag(4, "batch size when sampling validation images")
    pre_alloc_memory: int = flag(0, "GiB of GPU memory reserved by the allocator at start (GPU only)")
    local_rank: int = flag(-1, "set by the launcher; the rank is read from the environment")


@dataclass
class TrainConfig:
    """Everything a training run needs; one section per concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    schedule: FewStepSchedule = field(default_factory=FewStepSchedule)
    pcm: PCMConfig = field(default_factory=PCMConfig)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    dmd: DistributionMatchingConfig = field(default_factory=DistributionMatchingConfig)
    reflow: ReflowConfig = field(default_factory=ReflowConfig)
    dmd2: DMD2Config = field(default_factory=DMD2Config)


# sections every method reads; of the method sections, a method reads those of ``METHOD_USES`` and the flags
# of the others are refused for it
COMMON_SECTIONS = ("model", "data", "optim", "run")


# flag -> why it is refused. Each is parsed (so the message names it) and rejected when given.
REJECTED_REFERENCE_FLAGS: Dict[str, str] = {
    "revision": "models load from a local folder only (no model hub)",
    "variant": "models load from a local folder only (no model hub)",
    "enable_xformers_memory_efficient_attention": "xformers does not exist for Paddle",
    "text_encoder_lr": "the text encoders are frozen (only the transformer LoRA trains)",
    "adam_weight_decay_text_encoder": "the text encoders are frozen (only the transformer LoRA trains)",
    "weighting_scheme": "PCM draws solver-grid indices uniformly; flow-matching weighting does not apply",
    "logit_mean": "PCM draws solver-grid indices uniformly; flow-matching weighting does not apply",
    "logit_std": "PCM draws solver-grid indices uniformly; flow-matching weighting does not apply",
    "mode_scale": "PCM draws solver-grid indices uniformly; flow-matching weighting does not apply",
    "w_min": "guidance-scale sampling is for CFG-distilled students; set --guidance_scale",
    "w_max": "guidance-scale sampling is for CFG-distilled students; set --guidance_scale",
    "prodigy_beta3": "only AdamW is available",
    "prodigy_decouple": "only AdamW is available",
    "prodigy_use_bias_correction": "only AdamW is available",
    "prodigy_safeguard_warmup": "only AdamW is available",
    "push_to_hub": "no model hub access",
    "hub_token": "no model hub access",
    "hub_model_id": "no model hub access",
    "prior_generation_precision": "no prior-preservation images are generated",
    "use_distill_loss": "the multi-step distillation target is not implemented; use --num_teacher_steps "
                        "for several teacher Euler sub-steps per grid step",
}
# reference flags spelled differently here: reference flag -> (our field, value it sets)
_INVERTED_REFERENCE_FLAGS = {"not_apply_cfg_solver": ("apply_cfg_solver", False)}


def _sections(config_cls=TrainConfig):
    return [(f.name, f.type if isinstance(f.type, type) else f.default_factory) for f in dataclasses.fields(config_cls)]


def _parse_optional(type_):
    def parse(text):
        return None if text.lower() in ("none", "null") else type_(text)
    return parse


def build_parser(description: str = "Distil FLUX into a few-step LoRA student") -> argparse.ArgumentParser:
    """One flag per config field (plus the refused and renamed reference flags).

    Every flag defaults to ``argparse.SUPPRESS``: the parsed namespace holds exactly the flags given on the
    command line, and ``config_from_args`` fills the rest from the dataclass defaults.
    """
    parser = CommandLineParser(description=description, argument_default=argparse.SUPPRESS)
    seen = set()
    for section_name, section_cls in _sections():
        group = parser.add_argument_group(section_name)
        for fld in dataclasses.fields(section_cls):
            name = fld.name
            if name in seen:
                raise RuntimeError(f"config field {name} appears in two sections")
            seen.add(name)
            help_text = f"{fld.metadata.get('help', '')} (default: {fld.default})"
            if fld.type in (bool, "bool"):
                group.add_argument(f"--{name}", dest=name, action="store_const", const=True, help=help_text)
                group.add_argument(f"--no_{name}", dest=name, action="store_const", const=False,
                                   help=f"turn --{name} off")
                continue
            type_ = _field_scalar_type(fld)
            optional = "Optional" in str(fld.type)
            group.add_argument(f"--{name}", dest=name, type=_parse_optional(type_) if optional else type_,
                               choices=fld.metadata.get("choices"), help=help_text)
    for name in REJECTED_REFERENCE_FLAGS:
        parser.add_argument(f"--{name}", dest=f"_refused_{name}", nargs="?", const=True, help=argparse.SUPPRESS)
    for name, (target, value) in _INVERTED_REFERENCE_FLAGS.items():
        parser.add_argument(f"--{name}", dest=target, action="store_const", const=value,
                            help=f"same as --no_{target}")
    return parser


def _field_scalar_type(fld):
    text = str(fld.type)
    for name, type_ in (("int", int), ("float", float), ("str", str)):
        if fld.type is type_ or text in (name, f"typing.Optional[{name}]", f"Optional[{name}]"):
            return type_
    raise TypeError(f"config field {fld.name} has an unsupported type {fld.type}")


def config_from_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """Parse a command line into a ``TrainConfig``.

    Refused reference flags, and flags of a method section the chosen ``--method`` does not read (e.g.
    ``--adv_weight`` with ``--method pcm``), stop here with a message naming them.
    """
    parser = build_parser()
    given = vars(parser.parse_args(argv))
    refused = [name for name in REJECTED_REFERENCE_FLAGS if f"_refused_{name}" in given]
    if refused:
        lines = "\n".join(f"  --{name}: {REJECTED_REFERENCE_FLAGS[name]}" for name in refused)
        parser.error(f"these flags of the reference script are not supported here:\n{lines}")
    method = given.get("method", RunConfig.method)
    used = set(COMMON_SECTIONS) | set(METHOD_USES[method])
    sections, unused = {}, []
    for section_name, section_cls in _sections():
        names = [f.name for f in dataclasses.fields(section_cls)]
        if section_name not in used:
            unused += [name for name in names if name in given]
        sections[section_name] = section_cls(**{name: given[name] for name in names if name in given})
    unused += [name for name in METHOD_IGNORES.get(method, ()) if name in given]
    if unused:
        parser.error(f"--method {method} does not use {', '.join('--' + n for n in unused)} "
                     f"(these flags belong to {', '.join(m for m in METHOD_USES if m != method)})")
    config = TrainConfig(**sections)
    try:
        validate_config(config)
    except ValueError as error:
        parser.error(str(error))
    return config


def validate_config(config: TrainConfig) -> None:
    """Checks that need more than one field; each names the flag at fault."""
    checks = [
        (config.data.train_batch_size >= 1, "--train_batch_size must be >= 1"),
        (config.optim.gradient_accumulation_steps >= 1, "--gradient_accumulation_steps must be >= 1"),
        (config.run.checkpointing_steps >= 1, "--checkpointing_steps must be >= 1"),
        (config.run.checkpoints_total_limit is None or config.run.checkpoints_total_limit >= 1,
         "--checkpoints_total_limit must be >= 1"),
        (config.model.lora_rank >= 1, "--lora_rank must be >= 1"),
        (config.optim.max_train_steps is None or config.optim.max_train_steps >= 1, "--max_train_steps must be >= 1"),
        (config.data.resolution % 16 == 0, f"--resolution {config.data.resolution} must be a multiple of 16"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    try:
        resolve_target_modules(config.model.lora_target_modules)
    except ValueError as error:
        raise ValueError(f"--lora_target_modules: {error}") from None
    for section_name in METHOD_USES[config.run.method]:
        section = getattr(config, section_name)
        if hasattr(section, "validate"):
            section.validate()


def train_config(**fields) -> TrainConfig:
    """The default ``TrainConfig`` with ``fields`` set by flag name, each in its section:
    ``train_config(output_dir="out", max_train_steps=3, learning_rate=1e-3)``."""
    sections = {name: {} for name, _ in _sections()}
    owner = {fld.name: name for name, cls in _sections() for fld in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - set(owner))
    if unknown:
        raise KeyError(f"unknown training settings {unknown}")
    for name, value in fields.items():
        sections[owner[name]][name] = value
    return TrainConfig(**{name: cls(**sections[name]) for name, cls in _sections()})


def config_to_dict(config) -> Dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(values: Dict[str, Any]) -> TrainConfig:
    """Inverse of ``config_to_dict`` (unknown keys are an error naming them)."""
    sections = {}
    for section_name, section_cls in _sections():
        given = dict(values.get(section_name, {}))
        known = {f.name for f in dataclasses.fields(section_cls)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise KeyError(f"config section '{section_name}' has unknown keys {unknown}")
        sections[section_name] = section_cls(**given)
    return TrainConfig(**sections)


def save_config(config, path) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(config_to_dict(config), handle, indent=2, sort_keys=True)
