"""The model flags the generation and evaluation command lines share, and the pipeline they describe.

Either a FLUX.1-dev-layout folder (``--pretrained_model_name_or_path``), or the single files Black Forest Labs and
ComfyUI ship (``--transformer_file flux1-dev.safetensors --vae_file ae.safetensors --clip_l_file clip_l.safetensors
--t5_file t5xxl_fp16.safetensors``, fp8 files included) with ``--pretrained_model_name_or_path`` naming the folder
that holds ``tokenizer/`` and ``tokenizer_2/`` (FLUX.1-dev's repository without its weights is enough).
Training takes the same four flags with ``--pretrained_teacher_model`` naming the tokenizers' folder, or a single
transformer file as ``--pretrained_teacher_model`` (latent data).
"""
import argparse
from pathlib import Path
from typing import Dict, Optional, Sequence

FILE_FLAGS = {"transformer": "--transformer_file", "vae": "--vae_file", "clip_l": "--clip_l_file",
              "t5": "--t5_file"}
FILE_HELP = {"transformer": "FLUX transformer single file (flux1-dev / flux1-schnell.safetensors, Black Forest Labs "
                        "names, ComfyUI's model.diffusion_model. prefix and fp8 accepted)",
         "vae": "autoencoder single file (ae.safetensors)", "clip_l": "CLIP-L text encoder (clip_l.safetensors)",
         "t5": "T5-XXL encoder (t5xxl_fp16.safetensors or an fp8 variant)"}


def add_model_file_args(parser) -> None:
    """Add ``--transformer_file --vae_file --clip_l_file --t5_file`` to a parser or argument group."""
    for kind, flag in FILE_FLAGS.items():
        parser.add_argument(flag, default=None, metavar="FILE",
                            help=FILE_HELP[kind] + "; the four single-file flags go together, with "
                                               "--pretrained_model_name_or_path giving the tokenizers' folder")


def single_files(args, folder_flag: str = "--pretrained_model_name_or_path",
                 kinds: Sequence[str] = tuple(FILE_FLAGS)) -> Optional[Dict[str, Path]]:
    """``{kind: path}`` when single files are given (all of ``kinds``, each existing), None when none is; else
    ValueError naming the missing flags or absent files.

    ``args``: anything with the flags as attributes (an argparse namespace, training's ``ModelConfig``);
    ``folder_flag``: the flag that names the tokenizers' folder; ``kinds``: the files that go together (the latent
    cache needs no transformer)."""
    given = {kind: getattr(args, FILE_FLAGS[kind][2:], None) for kind in kinds}
    if not any(given.values()):
        return None
    missing = [FILE_FLAGS[kind] for kind, path in given.items() if not path]
    if missing:
        raise ValueError(f"single-file loading needs all of {', '.join(FILE_FLAGS[kind] for kind in kinds)}; "
                         f"missing: {', '.join(missing)}")
    absent = [f"{FILE_FLAGS[kind]} {path}" for kind, path in given.items() if not Path(path).is_file()]
    if absent:
        raise ValueError("file not found: " + ", ".join(absent))
    if not getattr(args, folder_flag[2:]):
        raise ValueError(f"with single files, {folder_flag} names the folder with tokenizer/ and tokenizer_2/")
    return {kind: Path(path) for kind, path in given.items()}


def load_pipeline(args: argparse.Namespace, dtype: str):
    """``FluxPipeline`` from the single files when given, else from the FLUX.1-dev-layout folder."""
    from .pipeline_flux import FluxPipeline

    files = single_files(args)
    if files:
        return FluxPipeline.from_single_files(**files, tokenizers=args.pretrained_model_name_or_path, dtype=dtype)
    return FluxPipeline.from_pretrained(args.pretrained_model_name_or_path, dtype=dtype)
