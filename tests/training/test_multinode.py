"""scripts/train_flux_lightning.sh across two "machines": two launchers on 127.0.0.1 (NNODES=2, NODE_RANK,
MASTER), one CPU process each (gloo), the FLUX-Lightning recipe on a tiny teacher; both ranks hold identical
adapters at every checkpoint, and a resume with the same layout goes on from the last checkpoint."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from training_toys import tiny_flux, tiny_latent_arrays

from ppdiffusers_fast.models import safetensors_io
from ppdiffusers_fast.models.weights import save_paddle_safetensors
from ppdiffusers_fast.training import checkpoint as ckpt

SCRIPT = Path(__file__).parents[2] / "scripts" / "train_flux_lightning.sh"
OVERRIDES = ["--resolution", "64", "--lora_rank", "4", "--lora_alpha", "4", "--dataloader_num_workers", "0",
             "--num_euler_timesteps", "8", "--multiphase", "2", "--lora_target_modules",
             "attn.to_q,attn.to_k,attn.to_v,proj_mlp", "--learning_rate", "1e-3", "--adv_lr", "1e-3",
             "--checkpointing_steps", "2"]


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_two_nodes(root, teacher, data, out, steps, tag):
    """Both node launchers at once; returns each node's worker log text."""
    master = f"127.0.0.1:{free_port()}"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PADDLE_", "FLAGS_selected"))}
    base.update(OMP_NUM_THREADS="1", PYTHON=sys.executable, TEACHER=str(teacher), DATA_PATH=str(data),
                OUTPUT_DIR=str(out), NNODES="2", MASTER=master)
    launchers = []
    for node in (0, 1):
        env = dict(base, NODE_RANK=str(node), LOG_DIR=str(root / f"logs-{tag}-node{node}"))
        launchers.append(subprocess.Popen(["bash", str(SCRIPT), "--max_train_steps", str(steps)] + OVERRIDES,
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = []
    for launcher in launchers:
        try:
            outputs.append(launcher.communicate(timeout=400)[0].decode(errors="replace"))
        except subprocess.TimeoutExpired:
            for other in launchers:
                other.kill()
            raise
    logs = ["\n".join(p.read_text(errors="replace") for p in sorted((root / f"logs-{tag}-node{n}").glob("workerlog.*")))
            for n in (0, 1)]
    for node, launcher in enumerate(launchers):
        assert launcher.returncode == 0, f"node {node}:\n{outputs[node][-3000:]}\n{logs[node][-3000:]}"
    return logs


def assert_ranks_identical(checkpoint):
    """Every rank's adapter digest equals the saved adapters' digest (so the two ranks are identical)."""
    saved = ckpt.load_trainable(checkpoint)
    digests = [ckpt.load_rank_state(checkpoint, rank)["trainable_sha256"] for rank in (0, 1)]
    assert digests[0] == digests[1] == ckpt.arrays_digest(saved)
    assert ckpt.load_training_state(checkpoint)["world_size"] == 2
    return saved


@pytest.mark.slow
def test_two_nodes_train_identically_and_resume(tmp_path):
    save_paddle_safetensors(tiny_flux(seed=4), tmp_path / "teacher" / "transformer" / "diffusion_pytorch_model.safetensors")
    arrays = tiny_latent_arrays(num_samples=6, latent_hw=(4, 4), seed=3)
    safetensors_io.save_file({k: (v, "F32") for k, v in arrays.items()}, tmp_path / "latents.safetensors")
    out = tmp_path / "out"

    launch_two_nodes(tmp_path, tmp_path / "teacher", tmp_path / "latents.safetensors", out, 2, "first")
    first = assert_ranks_identical(out / "checkpoint-2")
    lora_b = [v for k, v in first.items() if k.endswith("lora_B")]  # zero at the start
    assert lora_b and max(np.abs(v).max() for v in lora_b) > 1e-5
    positions = [ckpt.load_rank_state(out / "checkpoint-2", r)["data"]["sampler"] for r in (0, 1)]
    assert [p["rank"] for p in positions] == [0, 1] and positions[0]["position"] == positions[1]["position"] == 2

    logs = launch_two_nodes(tmp_path, tmp_path / "teacher", tmp_path / "latents.safetensors", out, 4, "resume")
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in logs[0] + logs[1]
    second = assert_ranks_identical(out / "checkpoint-4")
    assert any(not np.array_equal(first[k], second[k]) for k in first)
    saved_lora = safetensors_io.load_file(out / "flux_lightning_lora.safetensors")
    assert saved_lora and all(np.isfinite(v).all() for v in saved_lora.values())


@pytest.mark.parametrize("variables, message", [
    (dict(NNODES="2"), "NNODES=2 needs MASTER=<ip:port on the rank-0 machine> and NODE_RANK=<0..1>"),
    (dict(NNODES="2", MASTER="127.0.0.1", NODE_RANK="0"), "MASTER=127.0.0.1 is not ip:port"),
    (dict(NNODES="2", MASTER="127.0.0.1:8090", NODE_RANK="2"), "NODE_RANK=2 is not in 0..1"),
    (dict(NNODES="two"), "NNODES=two is not a positive number of machines"),
    (dict(NNODES="2", IPS="10.0.0.1"), "IPS=10.0.0.1 names 1 machines but NNODES=2"),
    (dict(IPS="10.0.0.1,10.0.0.2", MASTER="10.0.0.1:8090"), "give either IPS or MASTER with NODE_RANK, not both"),
])
def test_node_variables_are_checked_before_launching(tmp_path, variables, message):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PADDLE_", "FLAGS_selected"))}
    env.update(TEACHER=str(tmp_path), DATA_PATH=str(tmp_path), PYTHON="false", **variables)
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and message in result.stderr, result.stderr
