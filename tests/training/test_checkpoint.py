"""Checkpoints: contents, atomic writes (exception before the rename, process killed while writing), pruning."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from training_toys import latent_stream, tiny_pcm

from ppdiffusers_fast.training import checkpoint as ckpt
from ppdiffusers_fast.training.config import config_to_dict, train_config
from ppdiffusers_fast.training.trainer import Trainer

HERE = Path(__file__).parent


def _trainer(output_dir, steps, ema_decay=0.5, **kw):
    kw.setdefault("resume_from_checkpoint", None)
    config = train_config(output_dir=str(output_dir), max_train_steps=steps, report_to="none", seed=3,
                          checkpointing_steps=kw.pop("checkpointing_steps", 1), learning_rate=1e-3, **kw)
    return Trainer(tiny_pcm(ema_decay=ema_decay), latent_stream(), config)


def test_checkpoint_holds_adapters_optimizer_rng_data_and_config(tmp_path):
    trainer = _trainer(tmp_path, 2, checkpoints_total_limit=5)
    trainer.train()
    path = tmp_path / "checkpoint-2"
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "optimizer-generator.safetensors", "rank-0.json",
                                                      "trainable.safetensors", "training_state.json"]
    trainable = ckpt.load_trainable(path)
    assert any(".lora_adapters.student.lora_A" in k for k in trainable)
    assert any(".lora_adapters.student_ema.lora_B" in k for k in trainable)  # the EMA target too
    expected = {n: p.numpy() for n, p in trainer.method.checkpoint_tensors().items()}
    assert sorted(trainable) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(trainable[name], value)
    optimizer = ckpt.load_optimizer_arrays(path, "generator")
    states = {key.split("::")[1] for key in optimizer}
    assert states == {"moment1", "moment2", "beta1_pow_acc", "beta2_pow_acc"}
    state = ckpt.load_training_state(path)
    assert state["step"] == 2 and state["world_size"] == 1
    assert state["groups"]["generator"]["lr_scheduler"]["last_epoch"] == 2
    rank_state = ckpt.load_rank_state(path, 0)
    assert rank_state["data"]["sampler"]["position"] == 2  # two batches drawn (8 samples: epoch 0 continues)
    assert rank_state["data"]["sampler"]["epoch"] == 0
    assert set(rank_state["rng"]) >= {"paddle_cpu", "numpy", "python"}
    assert json.loads((path / "config.json").read_text()) == json.loads(json.dumps(config_to_dict(trainer.config)))


def test_keeps_only_the_newest_checkpoints(tmp_path):
    _trainer(tmp_path, 5, checkpoints_total_limit=2).train()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-5"]


def test_exception_between_write_and_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, 1)
    trainer.train()
    before = ckpt.load_trainable(tmp_path / "checkpoint-1")

    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(dst).name.startswith("checkpoint-"):
            raise OSError("simulated crash before the rename")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", failing_replace)
    trainer.max_train_steps = 2
    with pytest.raises(OSError, match="simulated crash"):
        trainer.train()
    monkeypatch.undo()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-1"]
    assert not any(p.name.startswith(ckpt.TEMP_PREFIX) for p in tmp_path.iterdir())  # cleaned up
    latest = ckpt.resolve_resume_path("latest", tmp_path)
    assert latest == tmp_path / "checkpoint-1"
    after = ckpt.load_trainable(latest)
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])
    resumed = _trainer(tmp_path, 2, resume_from_checkpoint="latest")
    assert resumed.train().resumed_from == str(tmp_path / "checkpoint-1")


KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {here!r})
    import ppdiffusers_fast.training.checkpoint as ckpt
    from training_toys import latent_stream, tiny_pcm
    from ppdiffusers_fast.training.config import train_config
    from ppdiffusers_fast.training.trainer import Trainer

    real_save = ckpt.save_arrays
    def save_then_die(arrays, path):
        real_save(arrays, path)
        if "checkpoint-2" in str(path) or ckpt.TEMP_PREFIX + "2" in str(path):
            os.kill(os.getpid(), signal.SIGKILL)  # killed mid-checkpoint: weights written, state not yet
    ckpt.save_arrays = save_then_die
    settings = train_config(output_dir={out!r}, max_train_steps=3, report_to="none", seed=3,
                            checkpointing_steps=1, learning_rate=1e-3, resume_from_checkpoint=None)
    Trainer(tiny_pcm(), latent_stream(), settings).train()
""")


def test_process_killed_while_writing_leaves_the_previous_checkpoint_loadable(tmp_path):
    script = tmp_path / "killed_writer.py"
    out = tmp_path / "run"
    script.write_text(KILLED_WRITER.format(here=str(HERE), out=str(out)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert (out / f"{ckpt.TEMP_PREFIX}2").is_dir()  # the interrupted write
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-1"]
    assert ckpt.resolve_resume_path("latest", out) == out / "checkpoint-1"
    trainer = Trainer(tiny_pcm(), latent_stream(), train_config(
        output_dir=str(out), max_train_steps=2, report_to="none", resume_from_checkpoint="latest",
        checkpointing_steps=1, learning_rate=1e-3, seed=None))
    result = trainer.train()
    assert result.resumed_from == str(out / "checkpoint-1") and result.step == 2
    assert not (out / f"{ckpt.TEMP_PREFIX}2").exists()  # the next save removed the stale folder
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]


def test_resume_paths(tmp_path):
    assert ckpt.resolve_resume_path("latest", tmp_path / "nothing-yet") is None  # fresh start
    assert ckpt.resolve_resume_path(None, tmp_path) is None
    with pytest.raises(FileNotFoundError, match="checkpoint-7"):
        ckpt.resolve_resume_path(str(tmp_path / "checkpoint-7"), tmp_path)


def test_resume_refuses_a_different_world_size(tmp_path):
    _trainer(tmp_path, 1).train()
    state_file = tmp_path / "checkpoint-1" / ckpt.STATE_FILE
    state = json.loads(state_file.read_text())
    state["world_size"] = 2
    state_file.write_text(json.dumps(state))
    rank_0 = tmp_path / "checkpoint-1" / ckpt.rank_file(0)
    (tmp_path / "checkpoint-1" / ckpt.rank_file(1)).write_text(rank_0.read_text())  # as a 2-process run leaves it
    with pytest.raises(ValueError, match="written by 2 processes"):
        _trainer(tmp_path, 2, resume_from_checkpoint="latest").train()


def _truncate(file: Path, keep: float = 0.5) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("damaged", [ckpt.STATE_FILE, ckpt.rank_file(0), ckpt.TRAINABLE_FILE,
                                     ckpt.optimizer_file("generator"), "config.json"])
def test_latest_skips_a_damaged_newest_checkpoint_and_says_why(tmp_path, damaged):
    _trainer(tmp_path, 2).train()  # checkpoint-1 and checkpoint-2
    _truncate(tmp_path / "checkpoint-2" / damaged)
    contents, notes = ckpt.find_resume_checkpoint("latest", tmp_path)
    assert contents.path == tmp_path / "checkpoint-1"
    assert len(notes) == 1 and notes[0].startswith(f"skipped checkpoint-2: checkpoint file "
                                                   f"{tmp_path / 'checkpoint-2' / damaged}: unreadable"), notes
    # the named damaged checkpoint is an error naming the file, before anything is loaded
    with pytest.raises(ckpt.CorruptCheckpointError, match=f"checkpoint file .*checkpoint-2/{damaged}: unreadable"):
        ckpt.find_resume_checkpoint(str(tmp_path / "checkpoint-2"), tmp_path)
    resumed = _trainer(tmp_path, 3, resume_from_checkpoint="latest")
    result = resumed.train()
    assert result.resumed_from == str(tmp_path / "checkpoint-1") and result.step == 3  # checkpoint-2 rewritten
    assert ckpt.resolve_resume_path("latest", tmp_path) == tmp_path / "checkpoint-3"


def test_named_checkpoint_with_bad_content_names_the_file(tmp_path):
    _trainer(tmp_path, 1).train()
    folder = tmp_path / "checkpoint-1"
    trainable = ckpt.load_trainable(folder)
    name = sorted(trainable)[0]
    trainable[name] = np.full_like(trainable[name], np.nan)
    ckpt.save_arrays(trainable, folder / ckpt.TRAINABLE_FILE)
    with pytest.raises(ckpt.CorruptCheckpointError, match=f"trainable.safetensors: NaN or infinite values in "
                                                          f"1 tensor \\({name}\\)"):
        _trainer(tmp_path, 2, resume_from_checkpoint=str(folder)).train()
    (folder / ckpt.rank_file(0)).write_text("[1, 2]")
    with pytest.raises(ckpt.CorruptCheckpointError, match="rank-0.json: holds a JSON list, not an object"):
        ckpt.read_checkpoint(folder)
    (folder / ckpt.rank_file(0)).unlink()
    contents, notes = ckpt.find_resume_checkpoint("latest", tmp_path)
    assert contents is None and notes == [f"skipped checkpoint-1: checkpoint file {folder / 'rank-0.json'}: missing"]


@pytest.mark.slow
def test_runs_killed_at_random_points_end_with_the_uninterrupted_lora(tmp_path):
    """SIGKILL at random events (file writes, torn writes, renames, updates), restart with ``latest`` each time:
    the final student LoRA equals that of a run that was never interrupted."""
    import random

    from safetensors.numpy import load_file as load_lora_file

    worker = [sys.executable, str(HERE / "fault_worker.py")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    straight = subprocess.run(worker + [str(tmp_path / "straight")], env=env, capture_output=True, text=True,
                              timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]
    total_events = int(straight.stdout.split("events ")[-1])
    rng = random.Random(15)
    out, kills = tmp_path / "killed", 0
    for kill_at in sorted(rng.sample(range(1, total_events // 2), 4)) + [0]:
        proc = subprocess.run(worker + [str(out), str(kill_at)], env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        kills += 1
    assert proc.returncode == 0 and kills >= 2, (kills, proc.stderr[-2000:])
    expected = load_lora_file(str(tmp_path / "straight" / "pcm_lora.safetensors"))
    final = load_lora_file(str(out / "pcm_lora.safetensors"))
    assert sorted(final) == sorted(expected)
    for name in expected:
        np.testing.assert_array_equal(final[name], expected[name], err_msg=name)
