"""The style example's data transform and style statistic, on hand-computed images."""
import numpy as np
import pytest

from demo.style_lora import bold_strokes, ink_coverage


def paper(size=5):
    """A blank ``[1, 3, size, size]`` image: paper is +1."""
    return np.ones([1, 3, size, size], dtype=np.float32)


def test_bold_strokes_grow_each_ink_pixel_to_its_3x3_neighbourhood():
    image = paper()
    image[:, :, 2, 2] = -1.0  # full ink
    image[:, :, 0, 4] = 0.0  # half ink in a corner
    bold = bold_strokes(image)[0, 0]
    expected_ink = np.zeros([5, 5])
    expected_ink[0:2, 3:5] = 0.5
    expected_ink[1:4, 1:4] = 1.0  # the full-ink dot wins where they overlap
    np.testing.assert_allclose((1 - bold) / 2, expected_ink, atol=0)
    assert bold_strokes(paper()).min() == 1.0  # blank paper stays blank


def test_ink_coverage_is_mean_ink_over_pixels():
    image = paper(4)
    image[:, :, :2, :] = -1.0  # half the pixels fully inked
    image[:, :, 2, 0] = 0.0  # one more pixel half inked
    assert ink_coverage(image) == (8 + 0.5) / 16
    assert ink_coverage(np.full([2, 3, 4, 4], -3.0, np.float32)) == 1.0  # values outside [-1, 1] are clipped


# ------------------------------------------------------------------------------------------------------------------
# the evaluation: targets and table from hand-made rows; the rows themselves on the committed demo teacher
# ------------------------------------------------------------------------------------------------------------------

def table_row(name, steps, ink_vs, fid, halves, style_scale=1.0, sampler="teacher"):
    reference = fid == 0.0
    return {"row": name, "sampler": sampler, "steps": steps, "style_scale": style_scale,
            "ink_coverage": 0.4 * (1 + ink_vs), "ink_vs_reference": ink_vs, "fid_disjoint": fid,
            "excess": None if reference else fid - 2.0, "excess_halves": None if reference else halves,
            "adherence": 1.0, "seconds_per_image": 0.01}


def test_targets_judge_the_first_student_row_against_the_best_euler_row():
    from demo.style_lora import markdown_table, targets

    table = [table_row("teacher + style, 50 Euler steps (reference)", 50, 0.0, 0.0, None),
             table_row("teacher + style, 50 Euler steps, other seeds (noise floor)", 50, 0.0, 2.0, [0.0, 0.0]),
             table_row("teacher + style at scale 0.9, 4 Euler steps", 4, -0.02, 6.0, [4.0, 4.2], 0.9),
             table_row("teacher + style, 4 Euler steps", 4, 0.001, 5.0, [3.0, 3.4]),
             table_row("teacher + style at scale 0.9 + 4-step student", 4, -0.099, 4.5, [2.5, 3.5], 0.9, "student"),
             table_row("teacher + style + 4-step student", 4, 0.12, 3.0, [1.0, 1.2], 1.0, "student")]
    verdict = targets(table)
    # the first student row (style at 0.9) against the lowest-FID Euler row (style at 1: 5.0 < 6.0)
    assert verdict["student_row"] == "teacher + style at scale 0.9 + 4-step student"
    assert verdict["euler_row"] == "teacher + style, 4 Euler steps"
    assert verdict["style_kept"] is True and verdict["beats_euler"] is True  # |-9.9%| <= 10%, 4.5 < 5.0
    assert verdict["beats_euler_both_halves"] is False  # half 2: 3.5 > 3.4
    verdict = targets(table[:4] + table[5:])
    assert verdict["style_kept"] is False  # +12% > 10%
    assert verdict["beats_euler"] is True and verdict["beats_euler_both_halves"] is True
    verdict = targets(table[:3] + table[4:])  # only the 0.9 Euler row left: 4.5 < 6.0 in all and in both halves
    assert verdict["euler_row"] == "teacher + style at scale 0.9, 4 Euler steps"
    assert verdict["beats_euler"] is True and verdict["beats_euler_both_halves"] is True
    lines = markdown_table([table[0], table[3]]).splitlines()
    assert lines[2] == "| teacher + style, 50 Euler steps (reference) | 50 | 0.4000 | +0.0% | 0 (reference) |  |  | " \
                       "100.0% | 0.010 |"
    assert lines[3] == "| teacher + style, 4 Euler steps | 4 | 0.4004 | +0.1% | 5.00 | 3.00 | 3.00 / 3.40 | " \
                       "100.0% | 0.010 |"


def test_memory_cache_measures_each_set_once():
    from demo.distribution_fid import MemoryCache

    calls = []
    cache = MemoryCache()
    first = cache.get("teacher50_A", lambda: calls.append(1) or "measured")
    assert cache.get("teacher50_A", lambda: calls.append(2) or "again") == first == "measured"
    assert calls == [1]


@pytest.fixture(scope="module")
def demo_parts(tmp_path_factory):
    """The committed demo teacher, its classifier, the real digits, and a style LoRA file with random updates."""
    from demo.classifier import load_classifier
    from demo.config import CLASSIFIER_WEIGHTS_NAME, DEMO_MODEL_DIR
    from demo.distribution_fid import real_digits
    from demo.teacher import DemoTeacher, read_demo_config
    from ppdiffusers_fast.models.lora import LoraConfig, adapter_modules, inject_lora
    from ppdiffusers_fast.models.lora_io import save_lora

    if not (DEMO_MODEL_DIR / "demo_config.json").is_file():
        pytest.skip("the demo model folder is not present")
    maker = DemoTeacher.from_folder(DEMO_MODEL_DIR)
    inject_lora(maker.transformer, LoraConfig(rank=4, alpha=4.0, target_modules=("attn.to_v", "ff.net.2")), "style")
    rng = np.random.default_rng(0)
    for adapter in adapter_modules(maker.transformer, "style").values():
        adapter.lora_B.set_value(rng.standard_normal(adapter.lora_B.shape).astype(np.float32) * 0.3)
    path = tmp_path_factory.mktemp("style") / "style_lora.safetensors"
    save_lora(maker.transformer, "style", path)
    demo = read_demo_config(DEMO_MODEL_DIR)
    classifier = load_classifier(DEMO_MODEL_DIR / CLASSIFIER_WEIGHTS_NAME, demo["classifier"]["resolution"])
    return DEMO_MODEL_DIR, classifier, real_digits(classifier, demo), path


def test_evaluate_rows_on_the_demo_teacher(tmp_path, demo_parts):
    """Style at scale 0 in the 4-step rows gives exactly the plain teacher's and the plain student's images."""
    from demo.config import STUDENT_LORA_NAME
    from demo.distribution_fid import MEASURE_SEEDS
    from demo.report import student_images, teacher_images
    from demo.style_lora import evaluate, ink_coverage
    from demo.teacher import DemoTeacher

    folder, classifier, real, style_path = demo_parts
    student = folder / STUDENT_LORA_NAME
    result = evaluate(DemoTeacher.from_folder(folder), classifier, real, style_path, student, tmp_path,
                      images_per_digit=2, style_scales=(1.0, 0.0), grid_columns=2)
    rows = {row["row"]: row for row in result["rows"]}
    assert list(rows) == ["teacher + style, 50 Euler steps (reference)",
                          "teacher + style, 50 Euler steps, other seeds (noise floor)",
                          "teacher + style, 4 Euler steps", "teacher + style at scale 0, 4 Euler steps",
                          "teacher + style + 4-step student", "teacher + style at scale 0 + 4-step student",
                          "teacher without style, 50 Euler steps"]
    assert rows["teacher + style, 50 Euler steps (reference)"]["ink_vs_reference"] == 0.0
    floor = rows["teacher + style, 50 Euler steps, other seeds (noise floor)"]
    assert floor["excess"] == 0.0 and floor["fid_disjoint"] == result["metric"]["floor"] > 0
    assert all(row["images"] == 20 for row in rows.values())
    plain = DemoTeacher.from_folder(folder)
    seeds = MEASURE_SEEDS.with_images_per_digit(2).eval_set()
    plain_euler = ink_coverage(teacher_images(plain, seeds, 4).images)
    plain_student = ink_coverage(student_images(plain, student, seeds, "student", "student").images)
    np.testing.assert_allclose(rows["teacher + style at scale 0, 4 Euler steps"]["ink_coverage"], plain_euler,
                               rtol=1e-6)
    np.testing.assert_allclose(rows["teacher + style at scale 0 + 4-step student"]["ink_coverage"], plain_student,
                               rtol=1e-6)
    assert abs(rows["teacher + style, 4 Euler steps"]["ink_coverage"] - plain_euler) > 1e-3  # the style acts
    assert (tmp_path / "style_grid.png").is_file() and (tmp_path / "style_results.md").is_file()


def test_style_training_is_reproducible_from_its_seed(tmp_path, demo_parts):
    """Two runs with one seed give the same LoRA tensors bit for bit (initial A included); another seed does not."""
    from demo.style_lora import train_style_lora
    from demo.teacher import DemoTeacher
    from ppdiffusers_fast.models.safetensors_io import load_file

    folder = demo_parts[0]
    tensors, losses = [], []
    for index, seed in enumerate([3, 3, 4]):
        path = tmp_path / f"style_{index}.safetensors"
        info = train_style_lora(DemoTeacher.from_folder(folder), path, steps=2, batch_size=4, seed=seed, log=None)
        tensors.append(load_file(str(path)))
        losses.append(info["final_loss"])
    assert sorted(tensors[0]) == sorted(tensors[1]) and len(tensors[0]) == 2 * 22  # attention targets, A and B
    assert all(np.array_equal(tensors[0][k], tensors[1][k]) for k in tensors[0]) and losses[0] == losses[1]
    assert not np.array_equal(tensors[0][next(iter(tensors[0]))], tensors[2][next(iter(tensors[0]))])


def test_measured_seeds_overlapping_the_reference_are_refused_before_training(tmp_path, capsys):
    from demo.style_lora import main

    with pytest.raises(SystemExit) as stop:
        main(["--output_dir", str(tmp_path), "--eval_seed", "100500", "--images_per_digit", "100"])
    assert stop.value.code == 2
    assert "overlap the reference's 100000..100999" in capsys.readouterr().err
    assert not (tmp_path / "style_lora.safetensors").exists()
