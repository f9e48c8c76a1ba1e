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

The metric's own spread: B split into two disjoint seed sets (the first and second half of every digit's seeds),
each with its own floor from the same half of the teacher-50 set; |excess(B1) - excess(B2)| is the metric's noise
at 500 images (larger than at 1000), next to the training-seed spread. Teacher sets are cached on disk (:class:`FeatureCache`: features, predicted digits, seconds per image;
safetensors) so that rows never recompute them.
"""
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from ppdiffusers_fast.evaluation.fid import activation_statistics, frechet_distance
from ppdiffusers_fast.models.safetensors_io import load_file, save_file

from .classifier import DigitClassifier, extract_features, predict_logits

__all__ = ["SeedSet", "REFERENCE_SEEDS", "MEASURE_SEEDS", "MeasuredSet", "FeatureCache", "MemoryCache",
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

    def subset(self, mask: np.ndarray) -> "MeasuredSet":
        return MeasuredSet(self.features[mask], self.predicted[mask], self.labels[mask], self.seconds_per_image)


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


class MemoryCache:
    """:class:`FeatureCache`'s interface without the disk: sets measured once per run (e.g. a teacher that carries
    a freshly trained style LoRA, whose sets must never be reused by another run)."""

    def __init__(self):
        self.sets: Dict[str, MeasuredSet] = {}

    def get(self, name: str, make: Callable[[], MeasuredSet]) -> MeasuredSet:
        if name not in self.sets:
            self.sets[name] = make()
        return self.sets[name]


class DistributionMetric:
    """The demo's metric: disjoint-seed FID, excess over the floor, same-seed FID, FID vs real, adherence.

    Args:
        measure_teacher: ``(seed_set, num_steps) -> MeasuredSet``: the teacher's Euler steps with its true CFG.
        real: the held-out real digits, measured.
        cache: where teacher sets are kept (:class:`FeatureCache` or :class:`MemoryCache`).
        reference_seeds, measure_seeds: the seed sets (disjoint; checked).
    """

    def __init__(self, measure_teacher: Callable[[SeedSet, int], MeasuredSet], real: MeasuredSet,
                 cache: Union[FeatureCache, MemoryCache], reference_seeds: SeedSet = REFERENCE_SEEDS,
                 measure_seeds: SeedSet = MEASURE_SEEDS):
        check_disjoint(reference_seeds, measure_seeds)
        self.measure_teacher = measure_teacher
        self.real = real
        self.cache = cache
        self.reference_seeds, self.measure_seeds = reference_seeds, measure_seeds
        self.reference = self.teacher(reference_seeds, 50)
        self.teacher_50 = self.teacher(measure_seeds, 50)
        self.floor = fid_between(self.teacher_50, self.reference)
        self.half_floors = [fid_between(half, self.reference) for half in self.halves(self.teacher_50)]

    def teacher(self, seed_set: SeedSet, steps: int) -> MeasuredSet:
        """The teacher's ``steps``-step set on ``seed_set`` (cached)."""
        return self.cache.get(f"teacher{steps}_{seed_set.key()}", lambda: self.measure_teacher(seed_set, steps))

    def halves(self, measured: MeasuredSet) -> List[MeasuredSet]:
        """The set split into two disjoint seed sets: the first and the second half of every digit's images."""
        per_digit = self.measure_seeds.images_per_digit
        position = np.arange(len(measured.labels)) % per_digit
        return [measured.subset(position < per_digit // 2), measured.subset(position >= per_digit // 2)]

    def row(self, measured: MeasuredSet) -> dict:
        """Metric columns of one row measured on the seeds B (``measure_seeds``).

        ``excess_halves``: the excess of each half of B (two disjoint seed sets, each with its own floor from the
        same half of the teacher-50 set); ``metric_spread = |difference|`` is the metric's own noise at half size.
        """
        fid = fid_between(measured, self.reference)
        halves = [fid_between(half, self.reference) - floor
                  for half, floor in zip(self.halves(measured), self.half_floors)]
        return {"fid_disjoint": fid, "excess": fid - self.floor,
                "fid_same_seed": fid_between(measured, self.teacher_50), "fid_real": fid_between(measured, self.real),
                "adherence": measured.adherence, "seconds_per_image": measured.seconds_per_image,
                "excess_halves": halves, "metric_spread": abs(halves[0] - halves[1])}

    def teacher_row(self, steps: int) -> dict:
        return self.row(self.teacher(self.measure_seeds, steps))

    def description(self) -> dict:
        return {"reference": self.reference_seeds.key(), "measured": self.measure_seeds.key(), "floor": self.floor,
                "half_floors": self.half_floors, "reference_images": len(self.reference.labels),
                "measured_images": len(self.teacher_50.labels), "real_digits": len(self.real.labels)}


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
                 cache_dir: Union[str, Path], images_per_digit: int = 100,
                 reference_images_per_digit: int = 100) -> DistributionMetric:
    """The metric for the demo teacher in ``folder``: reference teacher-50 images on seeds A
    (``reference_images_per_digit`` per digit, 1000 by default), measured sets of ``images_per_digit`` per digit on
    seeds B; teacher sets cached in ``cache_dir``."""
    from .report import teacher_images

    def measure_teacher(seed_set: SeedSet, steps: int) -> MeasuredSet:
        images = teacher_images(teacher, seed_set.eval_set(), steps)
        return MeasuredSet.from_images(classifier, images.images, images.labels, images.seconds_per_image)

    cache = FeatureCache(cache_dir, folder_fingerprint(folder, FINGERPRINT_FILES))
    return DistributionMetric(measure_teacher, real_digits(classifier, demo), cache,
                              reference_seeds=REFERENCE_SEEDS.with_images_per_digit(reference_images_per_digit),
                              measure_seeds=MEASURE_SEEDS.with_images_per_digit(images_per_digit))


def measure_student(metric: DistributionMetric, teacher, classifier: DigitClassifier, lora_path,
                    adapter_name: str, scale: Optional[float] = None):
    """Metric columns of a student LoRA sampled as its metadata says, on the metric's seeds B.

    ``scale``: the LoRA's scale (default its metadata's; 0 measures the base with the student's sampler).
    Returns ``(row, sampling metadata)``.
    """
    from .report import load_student, sample_student

    sampling, sigmas = load_student(teacher, lora_path, adapter_name, scale)
    images = sample_student(teacher, adapter_name, sigmas, metric.measure_seeds.eval_set(), adapter_name,
                            sampling=sampling)
    measured = MeasuredSet.from_images(classifier, images.images, images.labels, images.seconds_per_image)
    return metric.row(measured), sampling
