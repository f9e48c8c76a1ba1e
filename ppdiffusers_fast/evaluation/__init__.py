"""Evaluation: COCO-10k prompts, generation for evaluation, FID (InceptionV3 pool3), CLIP score, feature extractors.

Entry point: ``scripts/evaluate_coco10k.py`` (``coco_cli.main``) over ``coco_benchmark.run_coco_evaluation``.
"""
from .coco import PromptFileError, PromptList, prepare_prompts, prompts_sha256, read_caption_groups, select_prompts
from .fid import (
    ActivationStatistics,
    activation_statistics,
    fid_between_folders,
    frechet_distance,
    frechet_distance_from_statistics,
    load_statistics,
    save_statistics,
)
from .generate import LazyGenerateFn, generate_images, per_prompt_seed, pipeline_generate_fn

__all__ = [
    "ActivationStatistics", "LazyGenerateFn", "PromptFileError", "PromptList", "activation_statistics",
    "fid_between_folders", "frechet_distance", "frechet_distance_from_statistics", "generate_images",
    "load_statistics", "per_prompt_seed", "pipeline_generate_fn", "prepare_prompts", "prompts_sha256",
    "read_caption_groups", "save_statistics", "select_prompts",
]
