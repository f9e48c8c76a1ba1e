"""From a ``TrainConfig`` to a trained LoRA: what ``examples/flux_lightning/train_flux_lightning_lora.py`` calls.

    config = config_from_args(argv)
    result = run_training(config)

Steps: start the process (process group, seed, precision: ``trainer.start_process``), load the frozen teacher
transformer (``--pretrained_teacher_model``: a FLUX folder with ``transformer/``, a transformer folder or file; or
``--transformer_file --vae_file --clip_l_file --t5_file`` with the tokenizers' folder as
``--pretrained_teacher_model``), build
the data stream (``data.sources``: the layouts ``--data_path`` may hold), the method (``--method``; adapters
injected on the base), the validator (``training.validation``) and the trainer; train; export the student LoRA
with its sampling metadata.
"""
import json
from pathlib import Path
from typing import Optional, Tuple

import paddle

from ..command_line import UsageError, check_output_dir
from ..data.sources import (TeacherEncoders, build_training_data, detect_layout, teacher_folders,
                            unconditional_condition)
from ..methods.denoiser import FluxDenoiser
from ..methods.registry import build_method
from ..models.flux_folder import check_flux_folder, load_single_file_transformer
from ..models.weights import load_flux_transformer
from ..pipelines.model_files import single_files
from . import checkpoint as ckpt
from . import distributed as dist
from .config import TrainConfig
from .trainer import TrainResult, Trainer, start_process
from .validation import build_validator


def _reserve_gpu_memory(gib: int) -> None:
    """``--pre_alloc_memory``: let the allocator take ``gib`` GiB up front (as the reference does)."""
    if gib <= 0:
        return
    if paddle.get_device() == "cpu":
        raise ValueError("--pre_alloc_memory reserves GPU memory; it has no meaning on CPU")
    block = paddle.empty([int(gib * 1024 ** 3)], dtype="uint8")
    del block


def check_inputs(config: TrainConfig) -> Tuple[Path, TeacherEncoders]:
    """The user's errors, before any model or data is loaded (:class:`UsageError` naming the flag and path):
    the teacher folder and its transformer ``config.json`` (or the four single files and the tokenizers' folder),
    the layout of ``--data_path``, a checkpoint named by ``--resume_from_checkpoint`` (every file read and checked),
    a writable ``--output_dir``. Returns ``(transformer folder or file, the teacher's encoders)``."""
    try:
        files = single_files(config.model, folder_flag="--pretrained_teacher_model")
        if files:
            folder = check_flux_folder(config.model.pretrained_teacher_model, require=("tokenizer", "tokenizer_2"),
                                       need_index=False)
            transformer = files["transformer"]
            encoders = TeacherEncoders(Path(folder), files["vae"], files["clip_l"], files["t5"])
        else:
            transformer, flux_folder = teacher_folders(config.model.pretrained_teacher_model)
            encoders = TeacherEncoders(flux_folder)
            config_file = transformer / "config.json" if transformer.is_dir() else None
            if config_file is not None:
                try:
                    if not isinstance(json.loads(config_file.read_text(encoding="utf-8")), dict):
                        raise ValueError("not a JSON object")
                except ValueError as error:
                    raise ValueError(f"--pretrained_teacher_model: {config_file} is not a valid config ({error})")
        detect_layout(config.data)
        resume = config.run.resume_from_checkpoint
        if resume and resume != "latest":  # a named checkpoint must be intact ("latest" skips damaged ones)
            ckpt.find_resume_checkpoint(resume, config.run.output_dir)
    except (ValueError, FileNotFoundError) as error:  # CorruptCheckpointError is a ValueError
        raise UsageError(str(error)) from None
    check_output_dir(config.run.output_dir)
    return transformer, encoders


def _load_teacher(transformer: Path, encoders: TeacherEncoders, dtype: str):
    """The frozen teacher transformer; from single files, with the config the tokenizers' folder offers."""
    if encoders.single_files:
        return load_single_file_transformer(transformer, encoders.folder, dtype)
    return load_flux_transformer(transformer, dtype=dtype)


def run_training(config: TrainConfig) -> TrainResult:
    """Train ``config.run.method`` and export the student LoRA to ``--output_dir`` (rank 0)."""
    transformer, encoders = check_inputs(config)
    precision = start_process(config)
    rank, world = dist.rank(), dist.world_size()
    _reserve_gpu_memory(config.run.pre_alloc_memory)
    data = build_training_data(config.data, config.run.seed or 0, rank, world, encoders)

    denoiser = FluxDenoiser(_load_teacher(transformer, encoders, precision.weight_dtype))
    if config.model.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    unconditional = data.unconditional
    needs_uncond = not denoiser.has_guidance_embedding and config.model.teacher_guidance != "embedded"
    if needs_uncond and unconditional is None and encoders.has_text_encoders():
        encoder = data.encoders[1] if data.encoders else encoders.text_encoder(config.data.max_sequence_length)
        unconditional = unconditional_condition(encoder, data.stream.peek().latent_size)
    method = build_method(config.run.method, denoiser, config.model.lora_config(), config,
                          config.model.teacher_guidance, unconditional)
    validator = build_validator(config, data, encoders)
    result = Trainer(method, data.stream, config, validator, precision, data.batches_per_epoch).train()
    if rank == 0:
        exported = method.export(config.run.output_dir)
        if exported:
            print(f"student LoRA written to {exported}")
    dist.finish_distributed()
    return result
