"""The demo's distribution FID on synthetic classifier features: floors, excess, halves, cache, disjoint seeds.

Sets built as ``base + shift`` share one covariance, so their Frechet distance is ``|shift_a - shift_b|^2`` exactly
(the trace term vanishes): the expected values below are computed by hand from the shifts.
"""
import numpy as np
import pytest

from demo.distribution_fid import (REFERENCE_SEEDS, DistributionMetric, FeatureCache, MeasuredSet, SeedSet,
                                   check_disjoint, fid_between)

PER_DIGIT = 4
BASE = np.random.default_rng(0).standard_normal([10 * PER_DIGIT, 3]).astype(np.float64)
BASE -= BASE.mean(axis=0)
HALF_A = np.arange(10 * PER_DIGIT) % PER_DIGIT < PER_DIGIT // 2


def shifted(shift, predicted_offset=0):
    labels = np.repeat(np.arange(10), PER_DIGIT)
    features = (BASE + np.asarray(shift, dtype=np.float64)).astype(np.float32)
    return MeasuredSet(features, (labels + predicted_offset) % 10, labels, 0.01)


def test_same_covariance_sets_differ_by_the_squared_mean_shift():
    np.testing.assert_allclose(fid_between(shifted([1.0, 0, 0]), shifted([0, 2.0, 0])), 5.0, atol=1e-4)


def test_floor_excess_same_seed_and_halves(tmp_path):
    calls = []
    teacher_shifts = {(REFERENCE_SEEDS.name, 50): [0, 0, 0], ("B", 50): [0.5, 0, 0], ("B", 4): [0, 1.5, 0]}

    def measure_teacher(seed_set, steps):
        calls.append((seed_set.name, steps))
        return shifted(teacher_shifts[(seed_set.name, steps)])

    cache = FeatureCache(tmp_path, "teacher")
    measure = SeedSet("B", 200_000, PER_DIGIT)
    reference = REFERENCE_SEEDS.with_images_per_digit(PER_DIGIT)
    metric = DistributionMetric(measure_teacher, shifted([0, 0, 3.0]), cache, reference, measure)
    np.testing.assert_allclose(metric.floor, 0.25, atol=1e-4)  # |0.5|^2
    row = metric.teacher_row(4)
    np.testing.assert_allclose(row["fid_disjoint"], 2.25, atol=1e-4)  # |1.5|^2
    np.testing.assert_allclose(row["excess"], 2.0, atol=1e-4)
    np.testing.assert_allclose(row["fid_same_seed"], 0.25 + 2.25, atol=1e-4)  # vs teacher-50 on B
    np.testing.assert_allclose(row["fid_real"], 2.25 + 9.0, atol=1e-4)
    assert row["adherence"] == 1.0
    # halves: each keeps half of every digit's seeds; their own floors come from the same half of teacher-50 on B
    halves = metric.halves(shifted([0, 0, 0]))
    assert [len(h.labels) for h in halves] == [20, 20] and sorted(set(halves[0].labels)) == list(range(10))
    np.testing.assert_allclose(halves[0].features, shifted([0, 0, 0]).features[HALF_A])
    assert len(row["excess_halves"]) == 2 and row["metric_spread"] == abs(row["excess_halves"][0]
                                                                           - row["excess_halves"][1])
    # the cache: a second metric on the same folder measures nothing again
    again = DistributionMetric(measure_teacher, shifted([0, 0, 3.0]), cache, reference, measure)
    again.teacher_row(4)
    assert sorted(calls) == sorted([("A", 50), ("B", 50), ("B", 4)])
    assert sorted(p.name for p in (tmp_path / "teacher").iterdir()) == [
        "teacher4_B_200000_4.safetensors", "teacher50_A_100000_4.safetensors", "teacher50_B_200000_4.safetensors"]


def test_adherence_counts_prompted_digits():
    assert shifted([0, 0, 0], predicted_offset=1).adherence == 0.0
    assert shifted([0, 0, 0]).adherence == 1.0


def test_overlapping_seed_sets_are_refused():
    with pytest.raises(ValueError, match="overlap"):
        check_disjoint(SeedSet("A", 0, 100), SeedSet("B", 999, 100))
    check_disjoint(SeedSet("A", 0, 100), SeedSet("B", 1000, 100))


@pytest.mark.parametrize("ema_decay", [None, 0.95])
def test_checkpoint_lora_takes_the_adapter_the_run_exports(tmp_path, ema_decay):
    import json

    from demo.ablation import checkpoint_lora
    from ppdiffusers_fast.models.safetensors_io import load_file, save_file

    module = "transformer_blocks.0.attn.to_q"
    template = save_file({f"{module}.lora_A": np.zeros([4, 2], np.float32)}, tmp_path / "dmd2_lora.safetensors",
                         metadata={"sampling": "{}"})
    checkpoint = tmp_path / "checkpoint-50"
    checkpoint.mkdir()
    prefix = f"denoiser.transformer.{module}.lora_adapters"
    save_file({f"{prefix}.student.lora_A": np.full([4, 2], 1.0, np.float32),
               f"{prefix}.student_ema.lora_A": np.full([4, 2], 2.0, np.float32)}, checkpoint / "trainable.safetensors")
    (checkpoint / "config.json").write_text(json.dumps({"dmd2": {"dmd2_ema_decay": ema_decay}}))
    written = load_file(checkpoint_lora(checkpoint, template, tmp_path / "curve_50.safetensors"))
    assert list(written) == [f"{module}.lora_A"]
    np.testing.assert_array_equal(written[f"{module}.lora_A"], 1.0 if ema_decay is None else 2.0)
