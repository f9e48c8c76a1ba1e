"""examples/flux_lightning/train_flux_lightning_lora.py end to end on a tiny teacher folder (CPU):
trains, validates, checkpoints, resumes with `--resume_from_checkpoint latest`, exports a loadable LoRA."""
import re
import runpy
from pathlib import Path

import numpy as np
import pytest
from training_toys import tiny_flux, tiny_latent_arrays

from ppdiffusers_fast.command_line import UsageError, run_command
from ppdiffusers_fast.models import safetensors_io
from ppdiffusers_fast.models.lora_io import load_lora
from ppdiffusers_fast.models.weights import save_paddle_safetensors
from ppdiffusers_fast.training import checkpoint as ckpt

SCRIPT = Path(__file__).parents[2] / "examples" / "flux_lightning" / "train_flux_lightning_lora.py"


@pytest.fixture(scope="module")
def entry_point():
    return runpy.run_path(str(SCRIPT), run_name="train_flux_lightning_lora")["main"]


def _teacher_and_data(root: Path):
    save_paddle_safetensors(tiny_flux(seed=4), root / "teacher" / "transformer" / "diffusion_pytorch_model.safetensors")
    arrays = tiny_latent_arrays(num_samples=6, latent_hw=(4, 4), seed=3)
    safetensors_io.save_file({k: (v, "F32") for k, v in arrays.items()}, root / "latents.safetensors")
    return root / "teacher", root / "latents.safetensors"


def _argv(teacher, data, out, steps):
    return ["--method", "pcm", "--pretrained_teacher_model", str(teacher), "--data_path", str(data),
            "--output_dir", str(out), "--mixed_precision", "bf16", "--resolution", "64", "--lora_rank", "4",
            "--lora_alpha", "4", "--lora_target_modules", "attn.to_q,attn.to_k,attn.to_v,proj_mlp",
            "--learning_rate", "1e-3", "--loss_type", "huber", "--adam_weight_decay", "1e-3",
            "--max_train_steps", str(steps), "--dataloader_num_workers", "0", "--guidance_scale", "3.5",
            "--validation_steps", "2", "--num_validation_images", "2", "--checkpointing_steps", "2",
            "--checkpoints_total_limit", "2", "--train_batch_size", "2", "--gradient_accumulation_steps", "1",
            "--resume_from_checkpoint", "latest", "--seed", "453645634", "--num_euler_timesteps", "8",
            "--multiphase", "2", "--gradient_checkpointing", "--lr_scheduler", "constant_with_warmup",
            "--lr_warmup_steps", "1"]


def test_train_resume_and_export(tmp_path, entry_point):
    teacher, data = _teacher_and_data(tmp_path)
    out = tmp_path / "out"
    first = entry_point(_argv(teacher, data, out, 4))
    assert first.step == 4 and first.resumed_from is None and np.isfinite(first.losses["pcm"])
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    saved_config = ckpt.read_json(out / "checkpoint-4" / "config.json")
    assert saved_config["schedule"]["multiphase"] == 2 and saved_config["model"]["lora_rank"] == 4
    assert any((out / "logs").rglob("*")), "VisualDL wrote nothing"

    second = entry_point(_argv(teacher, data, out, 6))
    assert second.resumed_from == str(out / "checkpoint-4") and second.step == 6
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-4", "checkpoint-6"]

    lora_file = out / "pcm_lora.safetensors"
    model = tiny_flux(seed=4)
    metadata = load_lora(model, lora_file, "student")
    assert metadata["sampling"]["num_inference_steps"] == 2 and metadata["sampling"]["num_euler_timesteps"] == 8
    trained = ckpt.load_trainable(out / "checkpoint-6")
    exported = safetensors_io.load_file(lora_file)
    for name, value in exported.items():  # the exported adapter is the final checkpoint's student
        module, _, weight = name.rpartition(".")
        np.testing.assert_array_equal(trained[f"denoiser.transformer.{module}.lora_adapters.student.{weight}"], value)


def test_missing_inputs_are_named_before_loading(tmp_path, entry_point):
    teacher, data = _teacher_and_data(tmp_path)
    argv = _argv(teacher, data, tmp_path / "out", 1)
    bad_data = list(argv)
    bad_data[bad_data.index("--data_path") + 1] = str(tmp_path / "nowhere")
    with pytest.raises(UsageError, match="nowhere"):
        entry_point(bad_data)
    bad_teacher = list(argv)
    bad_teacher[bad_teacher.index("--pretrained_teacher_model") + 1] = str(tmp_path)
    with pytest.raises(UsageError, match="transformer"):
        entry_point(bad_teacher)


def test_user_errors_are_one_line_and_exit_2(tmp_path, entry_point, capsys):
    teacher, data = _teacher_and_data(tmp_path)
    argv = _argv(teacher, data, tmp_path / "out", 1)
    (teacher / "transformer" / "config.json").write_text("{truncated")
    unwritable = list(argv)
    unwritable[unwritable.index("--output_dir") + 1] = "/proc/x"
    cases = {"--pretrained_teacher_model: .*config.json is not a valid config": argv,
             "--output_dir /proc/x is not a writable folder": unwritable,
             "argument --lora_rank: invalid int value: 'four'": argv + ["--lora_rank", "four"],
             "--resume_from_checkpoint .*checkpoint-9: .* is not a checkpoint folder":
                 argv + ["--resume_from_checkpoint", str(tmp_path / "checkpoint-9")]}
    for expected, case in cases.items():
        if "config.json" not in expected:
            save_paddle_safetensors(tiny_flux(seed=4), teacher / "transformer" / "diffusion_pytorch_model.safetensors")
        with pytest.raises(SystemExit) as exit_info:
            run_command(entry_point, case)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
        assert re.search(expected, err), (expected, err)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing trained or written


def _write_base64_records(folder: Path, count=4):
    import base64
    import io

    from PIL import Image

    rng = np.random.RandomState(0)
    lines = []
    for i in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.randint(0, 255, (72, 80, 3), dtype=np.uint8)).save(buffer, format="PNG")
        caption = f'{{"caption": "a red square number {i}"}}'
        lines.append(f"{i}\t{caption}\t{base64.b64encode(buffer.getvalue()).decode()}\n")
    (folder / "part-0.txt").write_text("".join(lines))
    (folder / "filelist.txt").write_text("part-0.txt\n")
    return folder / "filelist.txt"


def test_raw_records_are_encoded_on_the_fly_with_the_teacher_folder(tmp_path, entry_point, fixtures_dir):
    """Base64 records + file list (the reference layout) -> VAE latents and T5/CLIP embeddings each step;
    validation decodes the student's samples with the VAE."""
    teacher = fixtures_dir / "pipeline" / "tiny_flux"
    file_list = _write_base64_records(tmp_path)
    out = tmp_path / "out"
    argv = ["--method", "pcm", "--pretrained_teacher_model", str(teacher), "--data_path", str(tmp_path),
            "--file_list_path", str(file_list), "--output_dir", str(out), "--resolution", "64",
            "--lora_rank", "2", "--max_train_steps", "2", "--dataloader_num_workers", "0", "--train_batch_size", "2",
            "--checkpointing_steps", "2", "--num_euler_timesteps", "8", "--multiphase", "2",
            "--validation_steps", "2", "--num_validation_images", "1", "--max_sequence_length", "16",
            "--validation_prompt", "a red square|a blue square"]
    result = entry_point(argv)
    assert result.step == 2 and np.isfinite(result.losses["pcm"])
    assert (out / "pcm_lora.safetensors").is_file()
    state = ckpt.load_rank_state(out / "checkpoint-2", 0)["data"]
    assert state["sampler"]["position"] == 2 and state["bad_records"]["num_good"] == 4


def test_third_party_noise_is_hidden_unless_verbose(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    quiet = subprocess.run([sys.executable, str(SCRIPT), "--help"], env=env, capture_output=True, text=True,
                           cwd=tmp_path, timeout=300)
    assert quiet.returncode == 0 and "--no_adv_alternate" in quiet.stdout
    assert quiet.stderr == "", quiet.stderr
    verbose = subprocess.run([sys.executable, str(SCRIPT), "--help", "--verbose"], env=env, capture_output=True,
                             text=True, cwd=tmp_path, timeout=300)
    assert "No ccache found" in verbose.stderr  # what the default hides (Paddle's import warning)
