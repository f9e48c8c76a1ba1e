"""The training command line: the reference run's flags, refused flags, method sections, JSON round trip."""
import json
import shlex

import pytest

from ppdiffusers_fast.training.config import (REJECTED_REFERENCE_FLAGS, TrainConfig, config_from_args,
                                              config_from_dict, config_to_dict, save_config)

# ALGORITHMS.md, the reference command line (launcher prefix removed)
REFERENCE = """
  --data_path your_path/laion-45w --file_list_path your_path/filelist_hwge1024_pwatermarkle0.5.txt
  --pretrained_teacher_model black-forest-labs/FLUX.1-dev --output_dir outputs/lora_flux_lightning
  --mixed_precision bf16 --fp16_opt_level O2 --resolution 1024 --lora_rank 32
  --learning_rate 5e-6 --loss_type huber --adam_weight_decay 1e-3 --max_train_steps 28652
  --dataloader_num_workers 32 --guidance_scale 3.5 --validation_steps 20000
  --checkpointing_steps 1000 --checkpoints_total_limit 30 --train_batch_size 1
  --gradient_accumulation_steps 1 --resume_from_checkpoint latest --seed 453645634
  --num_euler_timesteps 100 --multiphase 4 --gradient_checkpointing
  --adv_weight 0.1 --adv_lr 1e-5 --use_dmd_loss --dmd_weight 0.01
  --apply_reflow_loss --reflow_loss_weight 0.01
"""
PCM_PART = REFERENCE.split("--adv_weight")[0]


def test_reference_pcm_flags_map_onto_the_config():
    config = config_from_args(shlex.split(PCM_PART) + ["--method", "pcm"])
    assert config.data.data_path == "your_path/laion-45w"
    assert config.data.file_list_path == "your_path/filelist_hwge1024_pwatermarkle0.5.txt"
    assert config.model.pretrained_teacher_model == "black-forest-labs/FLUX.1-dev"
    assert (config.model.mixed_precision, config.model.fp16_opt_level) == ("bf16", "O2")
    assert config.model.lora_rank == 32 and config.model.gradient_checkpointing is True
    assert config.optim.learning_rate == 5e-6 and config.optim.adam_weight_decay == 1e-3
    assert config.optim.max_train_steps == 28652 and config.optim.gradient_accumulation_steps == 1
    assert (config.pcm.loss_type, config.schedule.guidance_scale) == ("huber", 3.5)
    assert (config.schedule.num_euler_timesteps, config.schedule.multiphase) == (100, 4)
    assert (config.run.checkpointing_steps, config.run.checkpoints_total_limit) == (1000, 30)
    assert config.run.resume_from_checkpoint == "latest" and config.run.seed == 453645634
    assert config.run.validation_steps == 20000 and config.data.dataloader_num_workers == 32
    assert config.run.method == "pcm"


def test_defaults_are_the_reference_run():
    default = TrainConfig()
    parsed = config_from_args(shlex.split(PCM_PART))
    for section in ("schedule", "pcm"):
        assert config_to_dict(parsed)[section] == config_to_dict(default)[section]
    for section in ("optim", "run"):
        for key, value in config_to_dict(default)[section].items():
            if key not in ("dataloader_num_workers",):
                assert config_to_dict(parsed)[section][key] == value, key


def test_full_reference_command_selects_flux_lightning_sections():
    config = config_from_args(shlex.split(REFERENCE) + ["--method", "flux_lightning"])
    assert config.adversarial.adv_weight == 0.1 and config.adversarial.adv_lr == 1e-5
    assert config.dmd.use_dmd_loss is True and config.dmd.dmd_weight == 0.01
    assert config.reflow.apply_reflow_loss is True and config.reflow.reflow_loss_weight == 0.01


def test_dmd2_reads_the_shared_schedule_and_refuses_pcm_only_flags(capsys):
    config = config_from_args(["--method", "dmd2", "--guidance_scale", "2.5", "--multiphase", "2",
                               "--num_euler_timesteps", "20"])
    assert (config.schedule.guidance_scale, config.schedule.multiphase, config.schedule.num_euler_timesteps) == \
        (2.5, 2, 20)
    for flag in ("--loss_type", "--num_teacher_steps"):
        with pytest.raises(SystemExit):
            config_from_args(["--method", "dmd2", flag, "2" if flag == "--num_teacher_steps" else "l2"])
        assert f"--method dmd2 does not use {flag}" in capsys.readouterr().err


def test_flags_of_another_method_are_refused_for_pcm(capsys):
    with pytest.raises(SystemExit):
        config_from_args(shlex.split(REFERENCE) + ["--method", "pcm"])
    err = capsys.readouterr().err
    assert "--method pcm does not use" in err and "--adv_weight" in err and "--reflow_loss_weight" in err


@pytest.mark.parametrize("flag", ["--use_distill_loss", "--enable_xformers_memory_efficient_attention",
                                  "--text_encoder_lr 1e-5", "--push_to_hub", "--w_min 3"])
def test_reference_flags_we_do_not_implement_are_refused_by_name(flag, capsys):
    with pytest.raises(SystemExit):
        config_from_args(shlex.split(flag))
    name = flag.split()[0][2:]
    err = capsys.readouterr().err
    assert f"--{name}: {REJECTED_REFERENCE_FLAGS[name]}" in err


def test_booleans_optionals_and_renamed_flags():
    config = config_from_args(["--no_gradient_checkpointing", "--ema_decay", "0.95", "--max_train_steps", "none",
                               "--not_apply_cfg_solver", "--checkpoints_total_limit", "None"])
    assert config.model.gradient_checkpointing is False
    assert config.pcm.ema_decay == 0.95 and config.pcm.apply_cfg_solver is False
    assert config.optim.max_train_steps is None and config.run.checkpoints_total_limit is None


def test_invalid_values_name_the_flag(capsys):
    for argv, text in ((["--multiphase", "200"], "--multiphase"), (["--resolution", "1000"], "--resolution"),
                       (["--loss_type", "l1"], "--loss_type"),
                       (["--lora_target_modules", " , "], "--lora_target_modules")):
        with pytest.raises(SystemExit):
            config_from_args(argv)
        assert text in capsys.readouterr().err


def test_resolved_config_round_trips_through_json(tmp_path):
    config = config_from_args(["--lora_rank", "8", "--multiphase", "2", "--method", "dmd2", "--adv_lr", "2e-5"])
    save_config(config, tmp_path / "config.json")
    loaded = config_from_dict(json.loads((tmp_path / "config.json").read_text()))
    assert loaded == config
    with pytest.raises(KeyError, match="unknown keys"):
        config_from_dict({"pcm": {"no_such_field": 1}})


def test_the_reference_command_line_runs_unchanged_with_the_reference_update_counts():
    """No --method: FLUX-Lightning; the reference alternates, so 28,652 steps are 14,326 generator and
    14,326 discriminator updates; --no_adv_alternate (opt-in) updates both at every step."""
    from training_toys import TINY_LORA, tiny_flux

    from ppdiffusers_fast.methods.denoiser import FluxDenoiser
    from ppdiffusers_fast.methods.registry import build_method

    def counts(argv):
        config = config_from_args(argv)
        assert config.run.method == "flux_lightning"
        method = build_method(config.run.method, FluxDenoiser(tiny_flux()), TINY_LORA, config)
        groups = [g for step in range(config.optim.max_train_steps) for g in method.update_schedule(step)]
        return groups.count("generator"), groups.count("discriminator")

    assert counts(shlex.split(REFERENCE)) == (14326, 14326)
    assert counts(shlex.split(REFERENCE) + ["--no_adv_alternate"]) == (28652, 28652)


def test_defaults_help_and_flags_a_method_does_not_read(capsys):
    import os

    from ppdiffusers_fast.training.config import build_parser

    assert TrainConfig().data.dataloader_num_workers == min(8, os.cpu_count())
    help_text = " ".join(build_parser().format_help().split())
    for switch in ("--gradient_checkpointing", "--no_gradient_checkpointing", "--adv_alternate",
                   "--no_adv_alternate", "--verbose"):
        assert f"{switch} " in help_text, switch
    for flag in ("--adv_alternate", "--adv_weight 0.1", "--dmd_weight 0.01"):
        with pytest.raises(SystemExit):
            config_from_args(["--method", "dmd2"] + flag.split())
        err = capsys.readouterr().err
        assert err.startswith(f"error: --method dmd2 does not use {flag.split()[0]}") and err.count("\n") == 1, err
