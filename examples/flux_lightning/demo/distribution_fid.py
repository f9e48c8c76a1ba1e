"""Distribution FID of the demo: every measured set is drawn from seeds disjoint from the reference's.

Why: a student that follows the teacher's trajectories, compared with the teacher's 50-step images *of the same
seeds*, scores below the sampling noise floor (it copies trajectories, the FID never sees the distribution). Here:

    reference  R = teacher, 50 Euler steps, seed set A (``REFERENCE_SEEDS``, 100 images per digit = 1000)
    measured   X = any row (teacher n steps, a student) on seed set B (``MEASURE_SEEDS``), disjoint from A
    floor        = FID(teacher-50 on B, R)             (two independent draws of the teacher's distribution)

    fid_disjoint  = FID(X_B, R)                  (Frechet distance of the classifier's 64-d features)
    excess        = fid_disjoint - floor         (what the row adds to the sampling noise of the metric)
    fid_same_seed = FID(X_B, teacher-50 on B)    (the old, trajectory-following figure, kept as its own column)
    fid_real      = FID(X_B, held-out real digits)  (the 600 digits of the classifier split, never seen by the teacher)
    adherence     = share of X_B classified as the prompted digit

The metric's own spread: the same row measured on a second disjoint seed set C (``SPREAD_SEEDS``, with its own
floor) gives ``excess_spread = excess_C``; |excess - excess_C| is the metric's noise next to the training-seed
spread. Teacher sets are cached on disk (:class:`FeatureCache`: features, predicted digits, seconds per image;
safetensors) so that rows never recompute them.
"""
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
from safetensors.numpy import load_file, save_file

from ppdiffusers_fast.evaluation.fid import activation_statistics, frechet_distance

from .classifier import DigitClassifier, extract_features, predict_logits

__all__ = ["SeedSet", "REFERENCE_SEEDS", "MEASURE_SEEDS", "SPREAD_SEEDS", "MeasuredSet", "FeatureCache",
           "fid_between", "DistributionMetric"]


@dataclass(frozen=True)
class SeedSet:
    """Labels ``0,0,..,9,9`` (``images_per_digit`` each) with seeds ``first_seed + i``."""

    name: str
    first_seed: int
    images_per_digit: int = 100

    @property
    def labels(self) -> List[int]:
        return [d for d in range(10) for _ in range(self.images_per_digit)]

    @property
    def seeds(self) -> List[int]:
        return [self.first_seed + i for i in range(10 * self.images_per_digit)]

    def key(self) -> str:
        return f"{self.name}_{self.first_seed}_{self.images_per_digit}"

    def eval_set(self):
        """The same labels and seeds as a ``report.EvalSet`` (the samplers' input)."""
        from .report import EvalSet

        return EvalSet(self.images_per_digit, self.first_seed)

    def with_images_per_digit(self, images_per_digit: int) -> "SeedSet":
        return SeedSet(self.name, self.first_seed, int(images_per_digit))


REFERENCE_SEEDS = SeedSet("A", 100_000)  # the reference teacher-50 set
MEASURE_SEEDS = SeedSet("B", 200_000)  # every measured row (and the floor's teacher-50 set)
SPREAD_SEEDS = SeedSet("C", 300_000)  # a second measured set: the metric's own spread


def check_disjoint(*sets: SeedSet) -> None:
    """Raise if two seed sets share a seed."""
    for i, a in enumerate(sets):
        for b in sets[i + 1:]:
            if set(a.seeds) & set(b.seeds):
                raise ValueError(f"seed sets {a.key()} and {b.key()} overlap")


@dataclass
class MeasuredSet:
    """Classifier view of one image set: features ``[N, 64]``, predicted digits ``[N]``, prompted digits ``[N]``."""

    features: np.ndarray
    predicted: np.ndarray
    labels: np.ndarray
    seconds_per_image: float = 0.0

    @classmethod
    def from_images(cls, classifier: DigitClassifier, images: np.ndarray, labels: Sequence[int],
                    seconds_per_image: float = 0.0) -> "MeasuredSet":
        """Classify ``images`` ``[N, 3, R, R]`` in [-1, 1]."""
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) != len(images):
            raise ValueError(f"got {len(images)} images and {len(labels)} labels")
        features = extract_features(classifier, images)
        predicted = predict_logits(classifier, images).argmax(axis=1).astype(np.int64)
        return cls(features.astype(np.float32), predicted, labels, float(seconds_per_image))

    @property
    def adherence(self) -> float:
        return float(np.mean(self.predicted == self.labels))


def fid_between(a: MeasuredSet, b: MeasuredSet) -> float:
    """Frechet distance of Gaussian fits to the two sets' features (``evaluation.fid``)."""
    stats_a = activation_statistics(a.features, "digit_classifier")
    stats_b = activation_statistics(b.features, "digit_classifier")
    return float(frechet_distance(stats_a.mu, stats_a.sigma, stats_b.mu, stats_b.sigma))


def folder_fingerprint(folder: Union[str, Path], files: Sequence[str]) -> str:
    """Short hash of the named files' sizes and first megabyte (cache entries of another teacher never match)."""
    digest = hashlib.sha256()
    for name in files:
        path = Path(folder) / name
        digest.update(name.encode())
        if path.is_file():
            digest.update(str(path.stat().st_size).encode())
            with open(path, "rb") as handle:
                digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:12]


class FeatureCache:
    """Measured teacher sets on disk: ``<folder>/<fingerprint>/<name>.safetensors`` (written atomically)."""

    def __init__(self, folder: Union[str, Path], fingerprint: str):
        self.folder = Path(folder) / fingerprint

    def get(self, name: str, make: Callable[[], MeasuredSet]) -> MeasuredSet:
        path = self.folder / f"{name}.safetensors"
        if path.is_file():
            arrays = load_file(str(path))
            return MeasuredSet(arrays["features"], arrays["predicted"], arrays["labels"],
                               float(arrays["seconds_per_image"][0]))
        measured = make()
        self.folder.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(path.name + ".tmp")
        save_file({"features": measured.features, "predicted": measured.predicted, "labels": measured.labels,
                   "seconds_per_image": np.array([measured.seconds_per_image], dtype=np.float64)}, str(temp),
                  metadata={"name": name})
        temp.replace(path)
        return measured


class DistributionMetric:
    """The demo's metric: disjoint-seed FID, excess over the floor, same-seed FID, FID vs real, adherence.

    Args:
        measure_teacher: ``(seed_set, num_steps) -> MeasuredSet``: the teacher's Euler steps with its true CFG.
        real: the held-out real digits, measured.
        cache: where teacher sets are kept.
        spread: also measure every row on ``SPREAD_SEEDS`` (the metric's own spread).
        reference_seeds, measure_seeds, spread_seeds: the seed sets (disjoint; checked).
    """

    def __init__(self, measure_teacher: Callable[[SeedSet, int], MeasuredSet], real: MeasuredSet,
                 cache: FeatureCache, spread: bool = True, reference_seeds: SeedSet = REFERENCE_SEEDS,
                 measure_seeds: SeedSet = MEASURE_SEEDS, spread_seeds: SeedSet = SPREAD_SEEDS):
        check_disjoint(reference_seeds, measure_seeds, spread_seeds)
        self.measure_teacher = measure_teacher
        self.real = real
        self.cache = cache
        self.seed_sets = [measure_seeds] + ([spread_seeds] if spread else [])
        self.reference_seeds = reference_seeds
        self.reference = self.teacher(reference_seeds, 50)
        self.teacher_50 = {s.name: self.teacher(s, 50) for s in self.seed_sets}
        self.floor = {s.name: fid_between(self.teacher_50[s.name], self.reference) for s in self.seed_sets}

    def teacher(self, seed_set: SeedSet, steps: int) -> MeasuredSet:
        """The teacher's ``steps``-step set on ``seed_set`` (cached)."""
        return self.cache.get(f"teacher{steps}_{seed_set.key()}", lambda: self.measure_teacher(seed_set, steps))

    def row(self, sets: Dict[str, MeasuredSet]) -> dict:
        """Metric columns of one row measured on each seed set (``{"B": ..., "C": ...}``)."""
        main = self.seed_sets[0].name
        out = {}
        for seed_set in self.seed_sets:
            measured = sets[seed_set.name]
            fid = fid_between(measured, self.reference)
            suffix = "" if seed_set.name == main else f"_{seed_set.name}"
            out[f"fid_disjoint{suffix}"] = fid
            out[f"excess{suffix}"] = fid - self.floor[seed_set.name]
            if suffix:
                continue
            out["fid_same_seed"] = fid_between(measured, self.teacher_50[main])
            out["fid_real"] = fid_between(measured, self.real)
            out["adherence"] = measured.adherence
            out["seconds_per_image"] = measured.seconds_per_image
        return out

    def teacher_row(self, steps: int) -> dict:
        return self.row({s.name: self.teacher(s, steps) for s in self.seed_sets})

    def description(self) -> dict:
        return {"reference": self.reference_seeds.key(), "measured": [s.key() for s in self.seed_sets],
                "floor": self.floor, "images_per_set": len(self.reference.labels),
                "real_digits": len(self.real.labels)}


def write_json_atomic(path: Union[str, Path], payload) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    temp.replace(path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# the demo teacher and students measured with the metric
# ----------------------------------------------------------------------------------------------------------------

FINGERPRINT_FILES = ("transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                     "digit_classifier.safetensors", "demo_config.json")


def real_digits(classifier: DigitClassifier, demo: dict) -> MeasuredSet:
    """The digits the teacher never saw (the classifier's train and test splits, 600), measured."""
    from .config import DemoSplit
    from .data import load_split

    split = load_split(demo["resolution"], DemoSplit(**demo["split"]))
    images = np.concatenate([split["classifier_train"].images, split["classifier_test"].images])
    labels = np.concatenate([split["classifier_train"].labels, split["classifier_test"].labels])
    return MeasuredSet.from_images(classifier, images, labels)


def build_metric(teacher, classifier: DigitClassifier, folder: Union[str, Path], demo: dict,
                 cache_dir: Union[str, Path], images_per_digit: int = 100, spread: bool = True,
                 reference_images_per_digit: int = 100) -> DistributionMetric:
    """The metric for the demo teacher in ``folder``: reference teacher-50 images on seeds A
    (``reference_images_per_digit`` per digit, 1000 by default), measured sets of ``images_per_digit`` per digit on
    seeds B (and C with ``spread``); teacher sets cached in ``cache_dir``."""
    from .report import teacher_images

    def measure_teacher(seed_set: SeedSet, steps: int) -> MeasuredSet:
        images = teacher_images(teacher, seed_set.eval_set(), steps)
        return MeasuredSet.from_images(classifier, images.images, images.labels, images.seconds_per_image)

    cache = FeatureCache(cache_dir, folder_fingerprint(folder, FINGERPRINT_FILES))
    return DistributionMetric(measure_teacher, real_digits(classifier, demo), cache, spread,
                              reference_seeds=REFERENCE_SEEDS.with_images_per_digit(reference_images_per_digit),
                              measure_seeds=MEASURE_SEEDS.with_images_per_digit(images_per_digit),
                              spread_seeds=SPREAD_SEEDS.with_images_per_digit(images_per_digit))


def measure_student(metric: DistributionMetric, teacher, classifier: DigitClassifier, lora_path,
                    adapter_name: str, keep_images: Optional[str] = None):
    """Metric columns of a student LoRA (sampled as its metadata says) on every measured seed set.

    Returns ``(row, sampling metadata, images of the set named keep_images or None)``.
    """
    from .report import load_student, sample_student

    sampling, sigmas = load_student(teacher, lora_path, adapter_name)
    sets, kept = {}, None
    for seed_set in metric.seed_sets:
        images = sample_student(teacher, adapter_name, sigmas, seed_set.eval_set(), adapter_name)
        sets[seed_set.name] = MeasuredSet.from_images(classifier, images.images, images.labels,
                                                      images.seconds_per_image)
        if seed_set.name == keep_images:
            kept = images
    return metric.row(sets), sampling, kept
