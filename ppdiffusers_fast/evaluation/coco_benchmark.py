"""The COCO-10k benchmark as one function: prompts -> teacher reference -> student -> FID-FLUX, CLIP, FID vs real.

Folder layout under ``output_dir`` (every step is cached and skipped when already done):

    prompts.json                           the chosen prompts + SHA-256 (coco.py)
    teacher_{steps}steps_{H}x{W}/          teacher reference images + generation.json (or ``teacher_dir``)
    student_{steps}steps_{H}x{W}/          student images + generation.json
    stats/{set}_{extractor}.npz            activation statistics (mu, sigma) with their cache key
    stats/{set}_clip.npz                   per-image CLIP cosines with their cache key
    hash_cache.json                        memoised file hashes
    results.json, results.md               numbers and protocol

FID-FLUX is the Frechet distance between the student's and the teacher's images for the same prompts and
seeds (teacher: the base model without LoRA, ``teacher_steps`` Euler steps). The generators are passed in as
``generate_fn(prompts, seeds)`` callables (wrap them in :class:`~.generate.LazyGenerateFn` so that nothing is
loaded when the images exist).
"""
import json
import os
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from .clip_score import clip_scores_for_images, summarize_clip_scores
from .coco import prepare_prompts
from .fid import activation_statistics, frechet_distance_from_statistics, load_statistics, save_statistics
from .generate import SEED_RULE, generate_images, image_filename
from .hashing import image_set_fingerprint
from .image_folder import folder_features, list_images, load_image
from .report import write_results

FID_FORMULA = "||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), float64"
FID_METHOD_NOTES = {"sqrtm": "scipy.linalg.sqrtm(S1 S2), eps*I fallback 1e-6 (as TF-FID / pytorch-fid)",
                    "eigh": "sum sqrt(eig(S1^1/2 S2 S1^1/2)), symmetric eigendecomposition"}
CLIP_FORMULA = ("clip_score = mean cos(image_embeds, text_embeds) of CLIPModel projections (plain cosine); "
                "clip_score_x100 = mean max(100 cos, 0) (torchmetrics convention)")


@dataclass
class EvaluationConfig:
    """Settings of one evaluation run (defaults: the COCO-10k protocol of the FLUX-Lightning report)."""

    output_dir: str
    captions_file: Optional[str] = None  # COCO captions .json, or .tsv / .txt prompts (first run only)
    num_prompts: int = 10000  # COCO-10k: one caption for each of 10,000 images
    prompt_seed: int = 0  # seed of the caption selection
    generation_seed: int = 0  # image i is generated with seed generation_seed + i
    height: int = 1024
    width: int = 1024
    student_steps: int = 4
    teacher_steps: int = 50  # reference set: the base model with 50 Euler steps
    guidance_scale: float = 3.5  # FLUX.1-dev embedded guidance, student and teacher
    teacher_dir: Optional[str] = None  # share one teacher cache between student runs
    batch_size: int = 4  # generation batch
    feature_batch_size: int = 50
    feature_extractor: str = "inception"  # inception | clip | path/to/file.py:function
    fid_method: str = "sqrtm"  # sqrtm (as pytorch-fid) | eigh (same value to ~1e-7, faster)
    clip_batch_size: int = 32
    show_progress: bool = True

    @property
    def teacher_folder(self):
        name = f"teacher_{self.teacher_steps}steps_{self.height}x{self.width}"
        return self.teacher_dir or os.path.join(self.output_dir, name)

    @property
    def student_folder(self):
        return os.path.join(self.output_dir, f"student_{self.student_steps}steps_{self.height}x{self.width}")


def _slug(text):
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


def _load_cache(path, key):
    """The cached npz at ``path`` if its stored key equals ``key``, else None."""
    if not os.path.isfile(path):
        return None
    with np.load(path, allow_pickle=False) as data:
        stored = json.loads(str(data["metadata"])) if "metadata" in data.files else None
        if stored != json.loads(json.dumps(key, sort_keys=True)):
            return None
    return path


def cached_statistics(image_dir, extractor, identity, cache_path, batch_size=50, show_progress=True,
                      num_images=None):
    """Activation statistics of ``image_dir`` (first ``num_images`` sorted files), cached at ``cache_path``.

    ``identity`` (a JSON-able dict naming the extractor and its weights) and the image set's fingerprint form
    the cache key; ``extractor`` is only called when the key does not match. Returns ``(stats, computed)``.
    """
    paths = list_images(image_dir)
    if num_images is not None:
        paths = paths[:num_images]
    if len(paths) < 2:
        raise ValueError(f"{image_dir}: at least 2 images are needed for FID, found {len(paths)}")
    key = {"extractor": identity, "images": image_set_fingerprint(paths), "num_images": len(paths)}
    if _load_cache(cache_path, key):
        stats, _ = load_statistics(cache_path)
        return stats, False
    features = folder_features(image_dir, extractor, batch_size=batch_size, show_progress=show_progress, paths=paths)
    stats = activation_statistics(features, extractor=extractor.name)
    save_statistics(cache_path, stats, metadata=key)
    return stats, True


def reference_statistics(source, extractor, identity, cache_path, batch_size=50, show_progress=True,
                         expected_name=None):
    """Statistics of real images: a folder (cached) or a precomputed ``.npz`` (its extractor name must match
    ``expected_name`` when both are known)."""
    if str(source).endswith(".npz"):
        stats, _ = load_statistics(source)
        if stats.extractor and expected_name and stats.extractor != expected_name:
            raise ValueError(f"{source} holds {stats.extractor!r} statistics, but the extractor is {expected_name!r}")
        return stats, False
    return cached_statistics(source, extractor, identity, cache_path, batch_size, show_progress)


def cached_clip_cosines(image_dir, prompts, embedder, embedder_id, cache_path, batch_size=32):
    """Per-image cosines [N] of ``image_dir``'s images ``00000.png ...`` against ``prompts``, cached."""
    paths = [os.path.join(image_dir, image_filename(i)) for i in range(len(prompts))]
    from .coco import prompts_sha256

    key = {"clip_model": embedder_id, "images": image_set_fingerprint(paths), "prompts_sha256": prompts_sha256(prompts)}
    if _load_cache(cache_path, key):
        with np.load(cache_path, allow_pickle=False) as data:
            return data["cosines"].astype(np.float64), False
    cosines = []
    for start in range(0, len(paths), batch_size):
        images = [load_image(p) for p in paths[start:start + batch_size]]
        cosines.append(clip_scores_for_images(embedder, images, prompts[start:start + batch_size], batch_size))
    cosines = np.concatenate(cosines)
    os.makedirs(os.path.dirname(cache_path), exist_ok=True)
    tmp = cache_path + ".tmp.npz"
    np.savez(tmp, cosines=cosines, metadata=np.array(json.dumps(key, sort_keys=True)))
    os.replace(tmp, cache_path)
    return cosines, True


def run_coco_evaluation(config, teacher_generate_fn, student_generate_fn, extractor_factory, extractor_identity,
                        clip_factory=None, identities=None, real_images=None):
    """Run every step (skipping finished ones) and write ``results.json`` / ``results.md``.

    Args:
        config: :class:`EvaluationConfig`.
        teacher_generate_fn, student_generate_fn: ``(prompts, seeds) -> images`` (lazy wrappers recommended).
        extractor_factory: zero-argument callable returning the FID :class:`~.features.FeatureExtractor`
            (called only when some statistics are not cached).
        extractor_identity: JSON-able dict naming the extractor and its weights (e.g. ``{"kind": "inception",
            "weights_sha256": ...}``); part of the statistics cache key and of the protocol.
        clip_factory: zero-argument callable returning a ``ClipEmbedder``, or None to skip CLIP
            (``identities["clip_model"]`` names it in cache keys and the protocol).
        identities: dict recorded in the protocol and in the generation manifests: ``model`` (fingerprint),
            ``lora`` (sha256 or None), ``lora_scale``, ``dtype``, ``clip_model``, ...
        real_images: optional folder of real images (or a precomputed ``.npz``) for FID vs real.
    Returns:
        the results dict (``metrics``, ``protocol``, ``work`` = what this run computed).
    """
    identities = dict(identities or {})
    os.makedirs(config.output_dir, exist_ok=True)
    prompt_list = prepare_prompts(os.path.join(config.output_dir, "prompts.json"), config.captions_file,
                                  config.num_prompts, config.prompt_seed)
    prompts = prompt_list.prompts
    common = {"prompts_sha256": prompt_list.sha256, "height": config.height, "width": config.width,
              "guidance_scale": config.guidance_scale, "model": identities.get("model"),
              "dtype": identities.get("dtype")}
    teacher_manifest = {**common, "role": "teacher", "num_inference_steps": config.teacher_steps, "lora": None}
    student_manifest = {**common, "role": "student", "num_inference_steps": config.student_steps,
                        "lora": identities.get("lora"), "lora_scale": identities.get("lora_scale")}
    work = {}
    for role, generate_fn, folder, manifest, steps in (
            ("teacher", teacher_generate_fn, config.teacher_folder, teacher_manifest, config.teacher_steps),
            ("student", student_generate_fn, config.student_folder, student_manifest, config.student_steps)):
        report = generate_images(generate_fn, prompts, folder, base_seed=config.generation_seed,
                                 batch_size=config.batch_size, manifest=manifest,
                                 image_size=(config.height, config.width), show_progress=config.show_progress,
                                 description=f"{role} {steps} steps")
        work[f"{role}_images_generated"] = report["generated"]

    stats_dir = os.path.join(config.output_dir, "stats")
    extractor = LazyExtractor(extractor_factory)
    metrics, stats = {}, {}
    for role, folder in (("teacher", config.teacher_folder), ("student", config.student_folder)):
        cache = os.path.join(stats_dir, f"{role}_{_slug(config.feature_extractor)}.npz")
        stats[role], computed = cached_statistics(folder, extractor, extractor_identity, cache,
                                                  config.feature_batch_size, config.show_progress, len(prompts))
        work[f"{role}_features_computed"] = computed
    metrics["fid_flux"] = frechet_distance_from_statistics(stats["student"], stats["teacher"], method=config.fid_method)

    clip_info = None
    if clip_factory is not None:
        clip_holder = []

        def embedder():
            if not clip_holder:
                clip_holder.append(clip_factory())
            return clip_holder[0]

        clip_id = identities.get("clip_model") or "clip"
        for role, folder in (("student", config.student_folder), ("teacher", config.teacher_folder)):
            cosines, computed = cached_clip_cosines(folder, prompts, _DeferredEmbedder(embedder), clip_id,
                                                    os.path.join(stats_dir, f"{role}_clip.npz"), config.clip_batch_size)
            summary = summarize_clip_scores(cosines)
            metrics[f"clip_score_{role}"] = summary["clip_score"]
            metrics[f"clip_score_{role}_x100"] = summary["clip_score_x100"]
            work[f"{role}_clip_computed"] = computed
        clip_info = {"model": clip_id, "formula": CLIP_FORMULA}

    real_info = None
    if real_images:
        real_cache = os.path.join(stats_dir, f"real_{_slug(config.feature_extractor)}.npz")
        real_stats, computed = reference_statistics(real_images, extractor, extractor_identity, real_cache,
                                                    config.feature_batch_size, config.show_progress,
                                                    expected_name=stats["student"].extractor)
        work["real_features_computed"] = computed
        metrics["fid_real_student"] = frechet_distance_from_statistics(stats["student"], real_stats,
                                                                       method=config.fid_method)
        metrics["fid_real_teacher"] = frechet_distance_from_statistics(stats["teacher"], real_stats,
                                                                       method=config.fid_method)
        real_info = {"source": str(real_images), "num_images": real_stats.num_samples}

    protocol = {
        "prompts": {"sha256": prompt_list.sha256, "num_prompts": len(prompts), "selection_seed": prompt_list.seed,
                    "source": prompt_list.source, "source_sha256": prompt_list.source_sha256},
        "seeds": {"rule": SEED_RULE, "base_seed": config.generation_seed},
        "resolution": f"{config.height}x{config.width}",
        "teacher": {"num_inference_steps": config.teacher_steps, "guidance_scale": config.guidance_scale,
                    "images": config.teacher_folder},
        "student": {"num_inference_steps": config.student_steps, "guidance_scale": config.guidance_scale,
                    "images": config.student_folder},
        "identities": identities,
        "feature_extractor": {"name": stats["student"].extractor, "feature_dim": int(stats["student"].mu.shape[0]),
                              **extractor_identity},
        "fid": {"formula": FID_FORMULA, "method": FID_METHOD_NOTES[config.fid_method],
                "num_samples": stats["student"].num_samples},
        "clip": clip_info,
        "real_images": real_info,
        "config": asdict(config),
    }
    results = {"metrics": metrics, "protocol": protocol, "work": work}
    write_results(config.output_dir, results)
    return results


class LazyExtractor:
    """A feature extractor built on first use (``name`` or call), so cached statistics never load a network."""

    def __init__(self, factory):
        self._factory = factory
        self._extractor = None

    def _get(self):
        if self._extractor is None:
            self._extractor = self._factory()
        return self._extractor

    @property
    def name(self):
        return self._get().name

    def __call__(self, images):
        return self._get()(images)


class _DeferredEmbedder:
    """Builds the CLIP embedder on first use."""

    def __init__(self, factory):
        self._factory = factory

    def image_embeddings(self, images):
        return self._factory().image_embeddings(images)

    def text_embeddings(self, texts):
        return self._factory().text_embeddings(texts)
