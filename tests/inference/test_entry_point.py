"""The text-to-image entry point on the tiny fixture folder: dygraph, --use_cinn, --inference_optimize, --benchmark."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ppdiffusers_fast.command_line import UsageError, run_command
from ppdiffusers_fast.inference import generate_cli

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "flux_lightning" / "text_to_image_generation_flux_lightning.py"
FOLDER = REPO / "tests" / "fixtures" / "pipeline" / "tiny_flux"
COMMON = ["--pretrained_model_name_or_path", str(FOLDER), "--prompt", "a cat on a chair", "--height", "64",
          "--width", "48", "--step", "3", "--seed", "7", "--num_images", "2", "--max_sequence_length", "8"]


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int32)


@pytest.fixture(scope="module")
def dygraph_pngs(tmp_path_factory):
    return generate_cli.main(COMMON + ["--output_dir", str(tmp_path_factory.mktemp("dygraph"))])


def test_dygraph_writes_one_png_per_image(dygraph_pngs):
    assert [p.name for p in dygraph_pngs] == ["000_seed7.png", "001_seed8.png"]
    assert pixels(dygraph_pngs[0]).shape == (64, 48, 3)


def test_use_cinn_writes_the_same_pngs(dygraph_pngs, tmp_path, capsys):
    paths = generate_cli.main(COMMON + ["--output_dir", str(tmp_path), "--use_cinn"])
    out = capsys.readouterr().out
    if not generate_cli.paddle.is_compiled_with_cinn():
        assert sum("CINN is not available" in line for line in out.splitlines()) == 1
    for mine, reference in zip(paths, dygraph_pngs):
        assert np.abs(pixels(mine) - pixels(reference)).max() <= 1  # uint8 rounding of outputs within 1e-4


def test_inference_optimize_script_writes_the_same_pngs(dygraph_pngs, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(SCRIPT), *COMMON, "--output_dir", str(tmp_path),
                             "--inference_optimize", "--predictor_dir", str(tmp_path / "predictor")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    paths = sorted(tmp_path.glob("*.png"))
    assert [p.name for p in paths] == ["000_seed7.png", "001_seed8.png"]
    assert (tmp_path / "predictor" / "transformer.pdiparams").is_file()
    for mine, reference in zip(paths, dygraph_pngs):
        assert np.abs(pixels(mine) - pixels(reference)).max() <= 1


def test_benchmark_prints_ms_per_image_and_per_call(tmp_path, capsys):
    generate_cli.main(COMMON + ["--output_dir", str(tmp_path), "--benchmark", "--warmup", "1", "--repeats", "1",
                                "--prompt_file", str(write_prompts(tmp_path))])
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("benchmark"))
    assert "ms per image" in line and "ms per transformer call (3 calls)" in line and "6 images" in line
    assert len(list(tmp_path.glob("*.png"))) == 6  # 2 prompts from the file + --prompt, 2 images each


def write_prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red apple\n\n  a blue car  \n")
    return path


def test_without_model_says_what_to_pass():
    with pytest.raises(UsageError) as error:
        generate_cli.main([])
    assert "--pretrained_model_name_or_path" in str(error.value) and "--path_to_lora" in str(error.value)


def test_size_not_multiple_of_16_is_refused_before_loading(tmp_path):
    with pytest.raises(UsageError, match="--height 40 is not a positive multiple of 16"):
        generate_cli.main(["--pretrained_model_name_or_path", str(tmp_path / "absent"), "--height", "40"])


def test_lora_metadata_and_compiled_student(tmp_path, capsys):
    import paddle

    from ppdiffusers_fast.models.lora import LoraConfig, inject_lora, layers_with_adapter
    from ppdiffusers_fast.models.lora_io import save_lora
    from ppdiffusers_fast.models.weights import load_flux_transformer

    model = load_flux_transformer(FOLDER / "transformer")
    inject_lora(model, LoraConfig(rank=2, alpha=2.0, target_modules=("attn.to_k", "proj_out")), "student")
    for _, layer in layers_with_adapter(model, "student"):
        b = layer.lora_adapters["student"].lora_B
        b.set_value(paddle.full(b.shape, 0.05))
    lora = tmp_path / "student.safetensors"
    save_lora(model, "student", lora, sampling=dict(num_inference_steps=2, multiphase=2, num_euler_timesteps=10,
                                                      guidance_scale=3.0, lora_scale=0.8))
    args = COMMON + ["--path_to_lora", str(lora), "--step", "2"]
    live = generate_cli.main(args + ["--output_dir", str(tmp_path / "live")])
    assert "scale 0.8" in capsys.readouterr().out
    fused = generate_cli.main(args + ["--output_dir", str(tmp_path / "fused"), "--use_cinn"])
    for mine, reference in zip(fused, live):
        assert np.abs(pixels(mine) - pixels(reference)).max() <= 1


def test_bfloat16_predictor_needs_inference_optimize():
    with pytest.raises(UsageError, match="needs --inference_optimize"):
        generate_cli.main(COMMON + ["--predictor_precision", "bfloat16"])


def test_bfloat16_predictor_writes_close_pngs(dygraph_pngs, tmp_path):
    from ppdiffusers_fast.inference.compile import bfloat16_available

    if not bfloat16_available():
        pytest.skip("the CPU has no native bfloat16")
    paths = generate_cli.main(COMMON + ["--output_dir", str(tmp_path), "--inference_optimize",
                                        "--predictor_precision", "bfloat16"])
    assert [Path(p).name for p in paths] == ["000_seed7.png", "001_seed8.png"]
    for mine, reference in zip(paths, dygraph_pngs):
        assert np.abs(pixels(mine) - pixels(reference)).max() <= 16  # bfloat16 rounding in the matrix products


def _student_lora(path, sampling_steps=2, value=0.05):
    import paddle

    from ppdiffusers_fast.models.lora import LoraConfig, inject_lora, layers_with_adapter
    from ppdiffusers_fast.models.lora_io import save_lora
    from ppdiffusers_fast.models.weights import load_flux_transformer

    model = load_flux_transformer(FOLDER / "transformer")
    inject_lora(model, LoraConfig(rank=2, alpha=2.0, target_modules=("attn.to_k",)), "student")
    for _, layer in layers_with_adapter(model, "student"):
        b = layer.lora_adapters["student"].lora_B
        b.set_value(paddle.full(b.shape, value))
    save_lora(model, "student", path, sampling=dict(num_inference_steps=sampling_steps, multiphase=sampling_steps,
                                                    num_euler_timesteps=10, guidance_scale=3.0))
    return path


def test_every_user_error_is_one_line_before_any_model_loads(tmp_path, capsys, monkeypatch):
    from safetensors.numpy import load_file, save_file

    from ppdiffusers_fast.pipelines import pipeline_flux

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(pipeline_flux.FluxPipeline, "from_pretrained", no_loading)
    lora = _student_lora(tmp_path / "student.safetensors")
    with open(lora, "rb") as handle:  # keep its metadata, fill its tensors with NaN
        import json
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    tensors = {k: np.full_like(v, np.nan) for k, v in load_file(str(lora)).items()}
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata=header["__metadata__"])
    out = ["--output_dir", str(tmp_path / "out")]
    cases = {"--seed must be >= 0, got -1": COMMON + out + ["--seed", "-1"],
             "--step must be >= 1, got 0": COMMON + out + ["--step", "0"],
             "--num_images must be >= 1, got 0": COMMON + out + ["--num_images", "0"],
             "nan.safetensors holds NaN or infinite values": COMMON + out + ["--path_to_lora",
                                                                           str(tmp_path / "nan.safetensors")],
             "--output_dir /proc/x is not a writable folder": COMMON + ["--output_dir", "/proc/x"],
             "model_index.json": ["--pretrained_model_name_or_path", str(tmp_path)] + out,
             "argument --seed: invalid int value": COMMON + out + ["--seed", "x"]}
    for expected, argv in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            run_command(generate_cli.main, argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        assert expected in err, (expected, err)


def test_step_defaults_to_the_loras_k_and_an_explicit_other_value_warns(tmp_path, capsys):
    lora = str(_student_lora(tmp_path / "student.safetensors", sampling_steps=2))
    base = [a for a in COMMON if a not in ("--step", "3")] + ["--output_dir", str(tmp_path / "out")]
    args = generate_cli.build_parser().parse_args(base + ["--path_to_lora", lora])
    generate_cli.check_arguments(args)
    assert args.step == 2 and "warning" not in capsys.readouterr().err
    args = generate_cli.build_parser().parse_args(base + ["--path_to_lora", lora, "--step", "4"])
    generate_cli.check_arguments(args)
    assert args.step == 4
    assert "warning: the LoRA was trained for 2 steps" in capsys.readouterr().err
    args = generate_cli.build_parser().parse_args(base)
    generate_cli.check_arguments(args)
    assert args.step == generate_cli.DEFAULT_STEPS  # no LoRA: no K to follow


def test_empty_prompt_is_used_as_given(tmp_path, monkeypatch):
    args = generate_cli.build_parser().parse_args(COMMON[:2] + ["--prompt", ""])
    assert generate_cli.read_prompts(args) == [""]
    seen = []
    real_generate = generate_cli.generate
    monkeypatch.setattr(generate_cli, "generate", lambda pipe, args, prompts: seen.append(prompts) or
                        real_generate(pipe, args, prompts))
    argv = [a if a != "a cat on a chair" else "" for a in COMMON] + ["--num_images", "1", "--output_dir",
                                                                       str(tmp_path)]
    paths = generate_cli.main(argv)
    assert seen == [[""]] and len(paths) == 1


def test_second_run_reuses_the_exported_predictor(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PPDIFFUSERS_FAST_CACHE", str(tmp_path / "cache"))
    for expected in ("exported to", "reused from"):
        generate_cli.main(COMMON + ["--output_dir", str(tmp_path / "out"), "--inference_optimize"])
        lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("predictor ")]
        assert len(lines) == 1 and expected in lines[0] and str(tmp_path / "cache" / "predictors") in lines[0]
    assert len(list((tmp_path / "cache" / "predictors").iterdir())) == 1


def test_predictor_cache_key_follows_the_lora_scale(tmp_path, capsys, monkeypatch):
    """The same LoRA at another scale is another student: its predictor is exported again, not reused."""
    from ppdiffusers_fast.models.lora import LoraConfig, inject_lora
    from ppdiffusers_fast.models.lora_io import save_lora
    from ppdiffusers_fast.models.weights import load_flux_transformer

    lora_file = tmp_path / "student.safetensors"
    model = load_flux_transformer(FOLDER / "transformer")
    inject_lora(model, LoraConfig(rank=2, alpha=2.0, target_modules=("attn.to_q",)), "student")
    save_lora(model, "student", lora_file)
    monkeypatch.setenv("PPDIFFUSERS_FAST_CACHE", str(tmp_path / "cache"))
    for scale, expected in (("1.0", "exported to"), ("0.5", "exported to"), ("1.0", "reused from")):
        generate_cli.main(COMMON + ["--output_dir", str(tmp_path / "out"), "--inference_optimize",
                                    "--path_to_lora", str(lora_file), "--lora_scale", scale])
        lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("predictor ")]
        assert len(lines) == 1 and expected in lines[0]
