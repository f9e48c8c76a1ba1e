"""The demo distillation on the committed teacher folder, with tiny step counts: cache, training through the
training entry point's config, checkpoints, resume, the exported LoRA's sampling metadata, loading in the
generation entry point, and the whole ``python examples/flux_lightning/run_demo.py --quick`` path."""
import json

import numpy as np
import pytest

from demo.config import DEMO_MODEL_DIR
from ppdiffusers_fast.models.safetensors_io import load_file

pytestmark = pytest.mark.skipif(not (DEMO_MODEL_DIR / "demo_config.json").is_file(),
                                reason="the demo model folder is not present")


@pytest.fixture(scope="module")
def teacher():
    from demo.teacher import DemoTeacher

    return DemoTeacher.from_folder(DEMO_MODEL_DIR)


@pytest.fixture(scope="module")
def latent_cache(tmp_path_factory, teacher):
    from demo.distill import build_latent_cache

    return build_latent_cache(tmp_path_factory.mktemp("cache") / "latents.safetensors", teacher, DEMO_MODEL_DIR,
                              max_images=40)


def test_latent_cache_matches_the_teacher_encoders(latent_cache, teacher):
    from demo.vae_training import encode_posterior
    from ppdiffusers_fast.training.batches import load_latent_file

    arrays = load_file(latent_cache)
    assert arrays["latents"].shape == (40, 16, teacher.latent_size, teacher.latent_size)
    labels = arrays["labels"]
    sequence, pooled = teacher.prompts.sequence.numpy(), teacher.prompts.pooled.numpy()
    np.testing.assert_allclose(arrays["prompt_embeds"], sequence[labels], atol=0)
    np.testing.assert_allclose(arrays["pooled_prompt_embeds"], pooled[labels], atol=0)
    np.testing.assert_allclose(arrays["uncond_prompt_embeds"][0], sequence[10], atol=0)  # the empty prompt
    # one latent recomputed by hand: (posterior mean - shift) * scale of the first training digit
    from demo.config import DemoSplit
    from demo.data import load_split
    from demo.teacher import read_demo_config

    demo = read_demo_config(DEMO_MODEL_DIR)
    digits = load_split(demo["resolution"], DemoSplit(**demo["split"]))["teacher_train"]
    assert labels[0] == digits.labels[0]
    mean, _ = encode_posterior(teacher.vae, digits.images[:1])
    cfg = teacher.vae.config
    np.testing.assert_allclose(arrays["latents"][0], (mean[0] - cfg.shift_factor) * cfg.scaling_factor,
                               rtol=1e-5, atol=1e-5)
    dataset = load_latent_file(latent_cache)
    assert len(dataset) == 40 and dataset.unconditional_condition() is not None


@pytest.mark.parametrize("row", ["pcm", "pcm_adv", "pcm_adv_dmd", "flux_lightning", "dmd2"])
def test_every_ablation_recipe_is_a_valid_command_line(row, tmp_path):
    from demo.distill import recipe_for, training_argv
    from ppdiffusers_fast.training.config import config_from_args

    recipe = recipe_for(row)
    config = config_from_args(training_argv(recipe, tmp_path, tmp_path / "latents.safetensors", DEMO_MODEL_DIR))
    assert config.run.method == recipe.method
    assert (config.schedule.num_euler_timesteps, config.schedule.multiphase) == (recipe.num_euler_timesteps,
                                                                                 recipe.multiphase)


def test_dmd2_recipes_reach_the_method_settings(tmp_path):
    from demo.distill import METHOD_RECIPES, recipe_for, training_argv
    from ppdiffusers_fast.training.config import config_from_args

    def parsed(name):
        return config_from_args(training_argv(recipe_for(name), tmp_path, tmp_path / "latents.safetensors",
                                              DEMO_MODEL_DIR))

    chosen = parsed("dmd2")
    assert chosen.dmd2.dmd2_fake_score_per_step and chosen.dmd2.dmd2_sampler == "euler"
    assert chosen.dmd.dmd_fake_score_updates == 5 and chosen.dmd.dmd_fake_score == "adapter"
    assert not parsed("dmd2_shared").dmd2.dmd2_fake_score_per_step
    assert parsed("dmd2_renoise").dmd2.dmd2_sampler == "renoise"
    assert parsed("dmd2_fake_rank_64").dmd.dmd_fake_score_rank == 64
    assert parsed("dmd2_shared_gen_lr_1e-3").optim.learning_rate == 1e-3
    for name in [n for n in METHOD_RECIPES if n.startswith("dmd2")]:
        assert parsed(name).run.method == "dmd2"


def test_pcm_recipes_train_on_32_grid_steps_and_sample_at_the_16_step_phase_edges():
    """The PCM-based rows train on N = 32 (the teacher's 32-step Euler error is below the metric's resolution, the
    16-step one is not); DMD2 keeps its N = 16 level grid, and ``*_n16`` rows reproduce the N = 16 results. With K = 4 the phase edges e_k = k N / K sit at
    t = 1, 3/4, 1/2, 1/4, 0 for both N, so the student samples at the same sigmas
    shift(t; mu) = e^mu / (e^mu + 1/t - 1), here at the demo's mu for 32x32 images (16 image tokens)."""
    import math

    from demo.distill import METHOD_RECIPES
    from ppdiffusers_fast import schedules

    grids = {"pcm": 32, "pcm_adv": 32, "pcm_adv_dmd": 32, "flux_lightning": 32, "dmd2": 16, "pcm_n16": 16,
             "flux_lightning_n16": 16, "pcm_dmd_phase_end": 16,
             "pcm_2000": 32}
    assert {name: METHOD_RECIPES[name].num_euler_timesteps for name in grids} == grids
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (16 - 256)  # resolution_mu(16) on FLUX.1's line
    assert schedules.resolution_mu(16) == pytest.approx(mu, abs=1e-12)
    expected = [1.0] + [math.exp(mu) / (math.exp(mu) + 1 / t - 1) for t in (0.75, 0.5, 0.25)] + [0.0]
    for n in (16, 32):
        np.testing.assert_allclose(schedules.phase_sigmas(4, n, mu).numpy(), expected, rtol=1e-6, atol=1e-7)


def test_training_checkpoints_resumes_and_exports_a_loadable_lora(tmp_path, latent_cache):
    from demo.distill import recipe_for, training_argv
    from ppdiffusers_fast.models.lora_io import read_safetensors
    from ppdiffusers_fast.training.config import config_from_args
    from ppdiffusers_fast.training.launch import run_training

    out = tmp_path / "run"
    recipe = recipe_for("flux_lightning", max_train_steps=2, checkpointing_steps=2, train_batch_size=4,
                        lr_warmup_steps=1)
    argv = training_argv(recipe, out, latent_cache, DEMO_MODEL_DIR)
    assert argv[argv.index("--teacher_guidance") + 1] == "cfg" and "--use_dmd_loss" in argv
    first = run_training(config_from_args(argv))
    assert first.step == 2 and first.resumed_from is None and first.checkpoints
    assert (out / "checkpoint-2").is_dir()

    longer = recipe_for("flux_lightning", max_train_steps=3, checkpointing_steps=2, train_batch_size=4,
                        lr_warmup_steps=1)
    second = run_training(config_from_args(training_argv(longer, out, latent_cache, DEMO_MODEL_DIR)))
    assert second.resumed_from is not None and second.resumed_from.endswith("checkpoint-2") and second.step == 3
    assert (out / "checkpoint-3").is_dir()

    lora = out / "flux_lightning_lora.safetensors"
    tensors, metadata, _ = read_safetensors(lora)
    sampling = json.loads(metadata["sampling"])
    assert sampling["num_inference_steps"] == 4 and sampling["multiphase"] == 4
    from demo.teacher import read_demo_config

    assert sampling["num_euler_timesteps"] == recipe.num_euler_timesteps
    assert sampling["guidance_scale"] == read_demo_config(DEMO_MODEL_DIR)["guidance_scale"]  # the teacher's CFG
    assert any(np.abs(v.numpy()).max() > 0 for k, v in tensors.items() if k.endswith("lora_B"))  # the student moved

    from ppdiffusers_fast.inference.generate_cli import main as generate

    paths = generate(["--pretrained_model_name_or_path", str(DEMO_MODEL_DIR), "--path_to_lora", str(lora),
                      "--prompt", "a handwritten digit seven", "--height", "32", "--width", "32",
                      "--max_sequence_length", "8", "--output_dir", str(tmp_path / "images"), "--seed", "3"])
    assert len(paths) == 1 and paths[0].is_file()


def example_files_state():
    """``{path: (size, mtime_ns)}`` of every file under examples/flux_lightning (caches excluded)."""
    root = DEMO_MODEL_DIR.parent
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


def test_quick_demo_writes_only_under_its_output_folder(tmp_path, monkeypatch):
    from demo.config import STUDENT_LORA_NAME
    from demo.quick_start import main

    monkeypatch.chdir(tmp_path)  # relative paths would land here
    before = example_files_state()
    result = main(["--quick", "--output_dir", str(tmp_path / "run")])
    table = result["table"]
    assert [row["steps"] for row in table] == [50, 4, 4]
    assert table[0]["excess"] == 0.0 and table[0]["fid_disjoint"] > 0  # the floor row: teacher-50 on other seeds
    for row in table:
        assert row["excess"] == row["fid_disjoint"] - table[0]["fid_disjoint"]
        assert 0.0 <= row["adherence"] <= 1.0 and row["fid_same_seed"] > -1e-3 and row["fid_real"] > 0
    assert table[1]["fid_same_seed"] > 0
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["rows"][2]["method"].startswith("student") and "checks" in saved
    assert "| method | steps |" in (tmp_path / "run" / "results.md").read_text()
    assert (tmp_path / "run" / "grid.png").is_file() and (tmp_path / "run" / STUDENT_LORA_NAME).is_file()
    assert example_files_state() == before  # the demo model folder and the example code are only read
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert list((tmp_path / "run" / "reference").rglob("teacher50_*.safetensors"))  # cached teacher sets
