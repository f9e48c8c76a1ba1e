"""scripts/evaluate_coco10k.py end to end on CPU: tiny generators, tiny captions, random-weight feature networks."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ppdiffusers_fast.command_line import UsageError
from ppdiffusers_fast.evaluation import coco_cli
from ppdiffusers_fast.evaluation.clip_score import ClipEmbedder, cosine_similarities
from ppdiffusers_fast.evaluation.features import load_custom_extractor
from ppdiffusers_fast.evaluation.fid import activation_statistics, frechet_distance_from_statistics

REPO = Path(__file__).resolve().parents[2]
CLIP_TINY = REPO / "tests" / "fixtures" / "evaluation" / "clip_tiny"

GENERATOR_SOURCE = '''
import json, os
import numpy as np

LOG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calls.jsonl")


def make(role, num_inference_steps, height, width, guidance_scale):
    def generate(prompts, seeds):
        with open(LOG, "a") as handle:
            handle.write(json.dumps({"role": role, "seeds": list(seeds), "steps": num_inference_steps}) + "\\n")
        images = []
        for prompt, seed in zip(prompts, seeds):
            pixels = np.random.default_rng(seed).integers(0, 200, (height, width, 3)).astype(np.float64)
            if role == "student":
                pixels = pixels * 0.9 + 5 * (len(prompt) % 7)
            images.append(np.clip(pixels, 0, 255).astype(np.uint8))
        return images
    return generate
'''

EXTRACTOR_SOURCE = '''
import paddle
from ppdiffusers_fast.evaluation.features import NetworkFeatureExtractor


def build():
    paddle.seed(3)
    network = paddle.nn.Sequential(paddle.nn.Conv2D(1, 4, 3, stride=2), paddle.nn.ReLU(), paddle.nn.Flatten(),
                                   paddle.nn.Linear(4 * 7 * 7, 6))
    return NetworkFeatureExtractor(network, name="tiny_digit_net", feature_dim=6, input_size=(16, 16), channels=1)
'''


@pytest.fixture
def workspace(tmp_path):
    (tmp_path / "gen.py").write_text(GENERATOR_SOURCE)
    (tmp_path / "extractor.py").write_text(EXTRACTOR_SOURCE)
    rows = ["image_id\tcaption"] + [f"{i}\t{text}" for i, text in enumerate(
        ["a cat on a mat", "the dog and the cat", "a red bus", "two people on a beach", "a photo of a stop sign",
         "a bowl of fruit", "a man riding a horse", "a kitchen with a stove"])]
    (tmp_path / "captions.tsv").write_text("\n".join(rows) + "\n")
    real = tmp_path / "real"
    real.mkdir()
    rng = np.random.default_rng(11)
    for i in range(5):
        Image.fromarray(rng.integers(30, 256, (40 + 4 * i, 50, 3)).astype(np.uint8)).save(real / f"real_{i}.jpg")
    return tmp_path


def base_args(workspace):
    return ["--generate_fn", f"{workspace / 'gen.py'}:make", "--captions_file", str(workspace / "captions.tsv"),
            "--num_prompts", "6", "--prompt_seed", "1", "--height", "32", "--width", "48", "--batch_size", "4",
            "--feature_extractor", f"{workspace / 'extractor.py'}:build", "--clip_model_path", str(CLIP_TINY),
            "--real_images_dir", str(workspace / "real"), "--output_dir", str(workspace / "out"), "--no_progress"]


def read_calls(workspace):
    path = workspace / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def folder_images(folder, count):
    return [np.asarray(Image.open(os.path.join(folder, f"{i:05d}.png"))) for i in range(count)]


def test_end_to_end_with_tiny_generator_then_rerun_and_resume(workspace):
    results = coco_cli.main(base_args(workspace))
    out = workspace / "out"
    teacher_dir, student_dir = out / "teacher_50steps_32x48", out / "student_4steps_32x48"
    calls = read_calls(workspace)
    assert [(c["role"], c["seeds"], c["steps"]) for c in calls] == [
        ("teacher", [0, 1, 2, 3], 50), ("teacher", [4, 5], 50), ("student", [0, 1, 2, 3], 4), ("student", [4, 5], 4)]

    # Numbers recomputed independently from the written images.
    prompts = [item["prompt"] for item in json.loads((out / "prompts.json").read_text())["items"]]
    extractor = load_custom_extractor(f"{workspace / 'extractor.py'}:build")
    teacher_stats = activation_statistics(extractor(folder_images(teacher_dir, 6)))
    student_stats = activation_statistics(extractor(folder_images(student_dir, 6)))
    metrics = results["metrics"]
    assert metrics["fid_flux"] == pytest.approx(frechet_distance_from_statistics(student_stats, teacher_stats), rel=1e-6)
    assert metrics["fid_flux"] > 0
    embedder = ClipEmbedder(CLIP_TINY)
    student_images = folder_images(student_dir, 6)
    cosines = cosine_similarities(embedder.image_embeddings(student_images), embedder.text_embeddings(prompts))
    assert metrics["clip_score_student"] == pytest.approx(cosines.mean(), abs=1e-6)
    assert metrics["clip_score_student_x100"] == pytest.approx(np.maximum(100 * cosines, 0).mean(), abs=1e-4)
    assert set(metrics) == {"fid_flux", "clip_score_student", "clip_score_student_x100", "clip_score_teacher",
                            "clip_score_teacher_x100", "fid_real_student", "fid_real_teacher"}

    # Protocol beside the numbers, in JSON and markdown.
    saved = json.loads((out / "results.json").read_text())
    protocol = saved["protocol"]
    payload = json.dumps(prompts, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    assert protocol["prompts"]["sha256"] == hashlib.sha256(payload).hexdigest()
    assert protocol["seeds"]["base_seed"] == 0 and "base_seed + i" in protocol["seeds"]["rule"]
    assert protocol["resolution"] == "32x48" and protocol["teacher"]["num_inference_steps"] == 50
    assert protocol["feature_extractor"]["name"] == "tiny_digit_net"
    assert protocol["identities"]["model"]["file_sha256"] == hashlib.sha256((workspace / "gen.py").read_bytes()).hexdigest()
    assert protocol["real_images"]["num_images"] == 5
    markdown = (out / "results.md").read_text()
    assert "FID-FLUX" in markdown and protocol["prompts"]["sha256"] in markdown

    # Rerun: nothing is generated or recomputed, same numbers.
    rerun = coco_cli.main(base_args(workspace))
    assert read_calls(workspace) == calls
    assert rerun["metrics"] == metrics
    assert not any(rerun["work"].values())

    # Resume: two missing student images are regenerated with their own seeds; the teacher stays cached.
    (student_dir / "00002.png").unlink()
    (student_dir / "00005.png").unlink()
    resumed = coco_cli.main(base_args(workspace))
    assert [(c["role"], c["seeds"]) for c in read_calls(workspace)[len(calls):]] == [("student", [2, 5])]
    assert resumed["work"]["student_images_generated"] == 2 and resumed["work"]["teacher_images_generated"] == 0
    assert resumed["work"]["student_features_computed"] and not resumed["work"]["teacher_features_computed"]
    assert resumed["metrics"]["fid_flux"] == pytest.approx(metrics["fid_flux"], rel=1e-9)  # same pixels again


def test_settings_mismatch_and_bad_inputs_fail_before_work(workspace):
    coco_cli.main(base_args(workspace))
    before = read_calls(workspace)
    with pytest.raises(ValueError, match="other settings.*guidance_scale"):
        coco_cli.main(base_args(workspace) + ["--guidance_scale", "2.0"])
    assert read_calls(workspace) == before
    with pytest.raises(ValueError, match="needs --inception_weights"):
        coco_cli.main(base_args(workspace) + ["--feature_extractor", "inception"])
    with pytest.raises(UsageError, match="--path_to_lora"):
        coco_cli.main(base_args(workspace) + ["--path_to_lora", str(workspace / "missing.safetensors")])
    with pytest.raises(ValueError, match="exactly one of"):
        coco_cli.main(base_args(workspace) + ["--pretrained_model_name_or_path", str(workspace)])


def test_several_loras_are_checked_before_work(workspace):
    lora = workspace / "student_lora.safetensors"
    make_tiny_student_lora(lora)
    flux = ["--pretrained_model_name_or_path", str(TINY_FLUX)] + base_args(workspace)[2:]
    args = coco_cli.build_parser().parse_args(flux + ["--path_to_lora", str(lora), str(lora)])
    coco_cli.validate_args(args)  # two files, each file's own scale
    with pytest.raises(ValueError, match="got 3 LoRA scales for 2 LoRA files"):
        coco_cli.main(flux + ["--path_to_lora", str(lora), str(lora), "--lora_scale", "1", "2", "3"])
    with pytest.raises(UsageError, match="--path_to_lora: file not found: .*missing.safetensors"):
        coco_cli.main(flux + ["--path_to_lora", str(lora), str(workspace / "missing.safetensors")])
    with pytest.raises(ValueError, match="--lora_scale needs --path_to_lora"):
        coco_cli.main(flux + ["--lora_scale", "1"])
    assert not (workspace / "out").exists()


def test_script_runs_with_random_weight_inception(workspace):
    from safetensors.numpy import save_file

    from ppdiffusers_fast.evaluation.inception import reference_shapes
    from ppdiffusers_fast.evaluation.weight_recipe import random_state_dict

    weights = workspace / "inception_random.safetensors"
    save_file(random_state_dict(reference_shapes(), seed=5), str(weights))
    args = base_args(workspace)
    args[args.index("--feature_extractor") + 1] = "inception"
    args[args.index("--num_prompts") + 1] = "3"
    del args[args.index("--real_images_dir"):args.index("--real_images_dir") + 2]
    # eigh: the same Frechet distance as sqrtm (see test_fid.py), ~8x faster for 2048-d features on CPU.
    args += ["--inception_weights", str(weights), "--feature_batch_size", "8", "--fid_method", "eigh"]
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    completed = subprocess.run([sys.executable, str(REPO / "scripts" / "evaluate_coco10k.py")] + args,
                               capture_output=True, text=True, env=environment, cwd=str(workspace))
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((workspace / "out" / "results.json").read_text())
    assert np.isfinite(results["metrics"]["fid_flux"]) and results["metrics"]["fid_flux"] > 0
    extractor = results["protocol"]["feature_extractor"]
    assert extractor["name"] == "inception_v3_fid_pool3" and extractor["feature_dim"] == 2048
    assert extractor["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert results["protocol"]["fid"]["method"].startswith("sum sqrt(eig")


TINY_FLUX = REPO / "tests" / "fixtures" / "pipeline" / "tiny_flux"


def make_tiny_student_lora(path):
    """A LoRA on the tiny FLUX transformer's attention projections with non-zero (random) updates."""
    import paddle

    from ppdiffusers_fast.models import lora as lora_lib
    from ppdiffusers_fast.models import lora_io
    from ppdiffusers_fast.models.weights import load_flux_transformer

    transformer = load_flux_transformer(TINY_FLUX / "transformer")
    lora_lib.inject_lora(transformer, lora_lib.LoraConfig(rank=2, alpha=2.0, target_modules=("to_q", "to_v")),
                         "student")
    rng = np.random.default_rng(4)
    for parameter in lora_lib.adapter_parameters(transformer, "student"):
        parameter.set_value(paddle.to_tensor(rng.standard_normal(parameter.shape).astype("float32") * 0.5))
    lora_io.save_lora(transformer, "student", path)


def test_end_to_end_with_tiny_flux_pipeline(workspace, monkeypatch):
    from ppdiffusers_fast.pipelines.pipeline_flux import FluxPipeline

    lora_path = workspace / "student_lora.safetensors"
    make_tiny_student_lora(lora_path)
    loads = []
    original = FluxPipeline.from_pretrained.__func__

    def counting_from_pretrained(cls, folder, dtype="float32"):
        loads.append(str(folder))
        return original(cls, folder, dtype=dtype)

    monkeypatch.setattr(FluxPipeline, "from_pretrained", classmethod(counting_from_pretrained))
    args = ["--pretrained_model_name_or_path", str(TINY_FLUX), "--path_to_lora", str(lora_path), "--lora_scale", "1.0",
            "--captions_file", str(workspace / "captions.tsv"), "--num_prompts", "4", "--height", "32",
            "--width", "48", "--teacher_steps", "3", "--student_steps", "1", "--batch_size", "3",
            "--feature_extractor", f"{workspace / 'extractor.py'}:build", "--clip_model_path", str(CLIP_TINY),
            "--output_dir", str(workspace / "flux_out"), "--no_progress"]
    results = coco_cli.main(args)
    assert len(loads) == 1
    out = workspace / "flux_out"
    teacher = folder_images(out / "teacher_3steps_32x48", 4)
    student = folder_images(out / "student_1steps_32x48", 4)
    assert teacher[0].shape == (32, 48, 3) and np.isfinite(results["metrics"]["fid_flux"])
    assert any(np.abs(t.astype(int) - s.astype(int)).max() > 0 for t, s in zip(teacher, student))

    # Per-prompt seeds: prompt i regenerated alone with seed i gives the cached teacher image.
    prompts = [item["prompt"] for item in json.loads((out / "prompts.json").read_text())["items"]]
    pipe = original(FluxPipeline, str(TINY_FLUX))
    pipe.set_progress_bar_config(disable=True)
    alone = pipe(prompt=[prompts[2]], height=32, width=48, num_inference_steps=3, guidance_scale=3.5, seed=[2],
                 output_type="np").images[0]
    assert np.abs(np.round(alone * 255) - teacher[2].astype(np.float64)).max() <= 1

    protocol = results["protocol"]
    assert protocol["identities"]["lora"] == [hashlib.sha256(lora_path.read_bytes()).hexdigest()]
    assert protocol["identities"]["lora_scale"] == [1.0] and protocol["identities"]["model"]["num_files"] > 10
    assert protocol["student"]["num_inference_steps"] == 1 and protocol["teacher"]["num_inference_steps"] == 3

    # Rerun: everything cached, the pipeline is not even loaded.
    rerun = coco_cli.main(args)
    assert len(loads) == 1 and rerun["metrics"] == results["metrics"] and not any(rerun["work"].values())


def test_user_errors_are_one_line_and_student_steps_follow_the_lora(workspace, capsys):
    from ppdiffusers_fast.command_line import run_command
    from ppdiffusers_fast.models import lora as lora_lib
    from ppdiffusers_fast.models import lora_io
    from ppdiffusers_fast.models.weights import load_flux_transformer

    flux = ["--pretrained_model_name_or_path", str(TINY_FLUX), "--captions_file", str(workspace / "captions.tsv"),
            "--feature_extractor", f"{workspace / 'extractor.py'}:build", "--output_dir", str(workspace / "out")]
    transformer = load_flux_transformer(TINY_FLUX / "transformer")
    lora_lib.inject_lora(transformer, lora_lib.LoraConfig(rank=2, alpha=2.0, target_modules=("to_q",)), "student")
    good, bad = workspace / "k2.safetensors", workspace / "nan.safetensors"
    lora_io.save_lora(transformer, "student", good, sampling={"num_inference_steps": 2, "multiphase": 2})
    from safetensors.numpy import load_file, save_file
    with open(good, "rb") as handle:
        metadata = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))["__metadata__"]
    save_file({k: np.full_like(v, np.inf) for k, v in load_file(str(good)).items()}, str(bad), metadata=metadata)
    cases = {"--seed must be >= 0, got -1": base_args(workspace) + ["--seed", "-1"],
             "--output_dir /proc/x is not a writable folder": base_args(workspace) + ["--output_dir", "/proc/x"],
             "nan.safetensors holds NaN or infinite values": flux + ["--path_to_lora", str(bad)],
             "argument --num_prompts: invalid int value": base_args(workspace) + ["--num_prompts", "many"]}
    for expected, argv in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            run_command(coco_cli.main, argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        assert expected in err, (expected, err)
    args = coco_cli.build_parser().parse_args(flux + ["--path_to_lora", str(good)])
    coco_cli.validate_args(args)
    assert args.student_steps == 2 and "warning" not in capsys.readouterr().err
    args = coco_cli.build_parser().parse_args(flux + ["--path_to_lora", str(good), "--student_steps", "4"])
    coco_cli.validate_args(args)
    assert args.student_steps == 4 and "the LoRA was trained for 2 steps" in capsys.readouterr().err
