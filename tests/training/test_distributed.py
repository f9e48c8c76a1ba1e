"""2-process data-parallel PCM on a tiny FLUX (CPU, gloo): both ranks end with identical LoRA weights."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from ppdiffusers_fast.models.safetensors_io import load_file
from ppdiffusers_fast.training import checkpoint as ckpt

WORKER = Path(__file__).parent / "distributed_pcm_worker.py"


def test_two_ranks_hold_identical_lora_weights(tmp_path):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PADDLE_", "FLAGS_selected"))}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
           "--log_dir", str(tmp_path / "logs"), str(WORKER), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, timeout=300)
    logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted((tmp_path / "logs").glob("workerlog.*")))
    assert proc.returncode == 0, logs or proc.stderr.decode()[-3000:]

    rank0, rank1 = load_file(out / "rank-0.safetensors"), load_file(out / "rank-1.safetensors")
    assert sorted(rank0) == sorted(rank1) and rank0
    for name in rank0:
        np.testing.assert_array_equal(rank0[name], rank1[name], err_msg=name)
    lora_b = [v for k, v in rank0.items() if k.endswith("lora_B")]
    assert max(np.abs(v).max() for v in lora_b) > 1e-4  # trained, not just broadcast

    checkpoint = out / "checkpoint-4"
    assert (checkpoint / "rank-0.json").is_file() and (checkpoint / "rank-1.json").is_file()
    assert ckpt.load_training_state(checkpoint)["world_size"] == 2
    saved = ckpt.load_trainable(checkpoint)
    for name in rank0:
        np.testing.assert_array_equal(saved[name], rank0[name])
    data0, data1 = ckpt.load_rank_state(checkpoint, 0)["data"], ckpt.load_rank_state(checkpoint, 1)["data"]
    assert data0["sampler"]["rank"] == 0 and data1["sampler"]["rank"] == 1
    # 8 samples, global batch 2 x 2 ranks: 2 batches per epoch; 4 updates = epoch 1, position 2
    assert (data0["sampler"]["epoch"], data0["sampler"]["position"]) == (1, 2) == \
        (data1["sampler"]["epoch"], data1["sampler"]["position"])
