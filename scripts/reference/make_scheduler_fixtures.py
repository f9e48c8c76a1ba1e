"""Write the scheduler parity fixtures from diffusers' FlowMatchEulerDiscreteScheduler (PyTorch reference).

Run in the reference environment (torch + diffusers), from the repository root:

    /path/to/venv-ref/bin/python scripts/reference/make_scheduler_fixtures.py

Writes tests/fixtures/scheduler/:
- flux1_dev_scheduler_config.json: FLUX.1-dev's scheduler/scheduler_config.json (as published);
- flow_match_euler.json: for image_seq_len 256/1024/4096 and n = 4/28/50, the ``mu`` of FLUX's
  pipeline, and the ``sigmas`` / ``timesteps`` after ``set_timesteps(sigmas=linspace(1, 1/n, n), mu=mu)``
  (the FLUX pipeline's call) and after ``set_timesteps(num_inference_steps=n, mu=mu)``; the same for a
  static-shift config (shift 3.0, no dynamic shifting); the diffusers version;
- flow_match_euler_steps.npz: a fixed float32 sample and velocities, and the result of each ``step()``
  of a 4-step schedule at 1024 tokens.
"""
import json
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "scheduler"

FLUX1_DEV_SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.30.0.dev0",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
SEQ_LENS = (256, 1024, 4096)
STEP_COUNTS = (4, 28, 50)


def flux_mu(seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15):
    """The ``calculate_shift`` line of diffusers' FLUX pipeline."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return seq_len * m + b


def as_list(tensor):
    return [float(v) for v in tensor.detach().cpu().numpy().astype(np.float64)]


def dynamic_cases(scheduler):
    cases = []
    for seq_len in SEQ_LENS:
        mu = flux_mu(seq_len)
        for n in STEP_COUNTS:
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
            explicit = {"sigmas": as_list(scheduler.sigmas), "timesteps": as_list(scheduler.timesteps)}
            scheduler.set_timesteps(num_inference_steps=n, mu=mu)
            default = {"sigmas": as_list(scheduler.sigmas), "timesteps": as_list(scheduler.timesteps)}
            cases.append({"image_seq_len": seq_len, "mu": mu, "num_inference_steps": n,
                          "explicit_sigmas": explicit, "default": default})
    return cases


def static_cases():
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    cases = []
    for n in STEP_COUNTS:
        scheduler.set_timesteps(num_inference_steps=n)
        cases.append({"num_inference_steps": n, "sigmas": as_list(scheduler.sigmas),
                      "timesteps": as_list(scheduler.timesteps)})
    return {"config": {"num_train_timesteps": 1000, "shift": 3.0}, "cases": cases}


def step_fixture(scheduler):
    rng = np.random.default_rng(1234)
    n = 4
    sample = rng.standard_normal((2, 16, 8)).astype(np.float32)
    velocities = rng.standard_normal((n, 2, 16, 8)).astype(np.float32)
    mu = flux_mu(1024)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
    x = torch.from_numpy(sample)
    outputs = []
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(torch.from_numpy(velocities[i]), t, x, return_dict=False)[0]
        outputs.append(x.numpy().copy())
    return {"sample": sample, "velocities": velocities, "outputs": np.stack(outputs),
            "mu": np.array(mu), "timesteps": scheduler.timesteps.numpy()}


def main():
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "flux1_dev_scheduler_config.json").write_text(json.dumps(FLUX1_DEV_SCHEDULER_CONFIG, indent=2) + "\n")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(FLUX1_DEV_SCHEDULER_CONFIG)
    data = {"diffusers_version": diffusers.__version__, "config": dict(scheduler.config),
            "dynamic": dynamic_cases(scheduler), "static": static_cases()}
    (OUT / "flow_match_euler.json").write_text(json.dumps(data, indent=1) + "\n")
    np.savez(OUT / "flow_match_euler_steps.npz", **step_fixture(scheduler))
    print(f"wrote fixtures to {OUT}")


if __name__ == "__main__":
    main()
