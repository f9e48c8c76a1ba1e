"""Flow-matching Euler scheduler (parity with diffusers' fixtures) and the Euler / few-step samplers."""
import json
import shutil

import numpy as np
import paddle
import pytest

from ppdiffusers_fast import schedules
from ppdiffusers_fast.schedulers.samplers import euler_update, few_step_sigmas, sample_euler
from ppdiffusers_fast.schedulers.scheduling_flow_match_euler import FlowMatchEulerDiscreteScheduler

PARITY_ATOL = 1e-6


@pytest.fixture
def reference(fixtures_dir):
    return json.loads((fixtures_dir / "scheduler" / "flow_match_euler.json").read_text())


@pytest.fixture
def flux_scheduler(fixtures_dir, tmp_path):
    """FLUX.1-dev's scheduler, loaded from a model folder in the FLUX.1-dev layout."""
    (tmp_path / "scheduler").mkdir()
    shutil.copy(fixtures_dir / "scheduler" / "flux1_dev_scheduler_config.json",
                tmp_path / "scheduler" / "scheduler_config.json")
    return FlowMatchEulerDiscreteScheduler.from_pretrained(str(tmp_path), subfolder="scheduler")


def test_loads_flux1_dev_config(flux_scheduler):
    config = flux_scheduler.config
    assert config.use_dynamic_shifting is True
    assert (config.shift, config.num_train_timesteps) == (3.0, 1000)
    assert (config.base_shift, config.max_shift) == (0.5, 1.15)
    assert (config.base_image_seq_len, config.max_image_seq_len) == (256, 4096)
    assert flux_scheduler.mu_for(schedules.image_seq_len(1024, 1024)) == pytest.approx(1.15, abs=1e-12)


def test_loads_config_written_by_recent_diffusers(reference):
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(reference["config"])
    assert scheduler.config.use_dynamic_shifting is True
    explicit = {k: v for k, v in reference["config"].items() if k != "_use_default_values"}
    with pytest.raises(NotImplementedError, match="use_karras_sigmas"):
        FlowMatchEulerDiscreteScheduler.from_config({**explicit, "use_karras_sigmas": True})


def test_sigmas_and_timesteps_match_diffusers(flux_scheduler, reference):
    assert {case["image_seq_len"] for case in reference["dynamic"]} == {256, 1024, 4096}
    for case in reference["dynamic"]:
        n = case["num_inference_steps"]
        mu = flux_scheduler.mu_for(case["image_seq_len"])
        assert mu == pytest.approx(case["mu"], abs=1e-12)
        flux_scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
        assert list(flux_scheduler.sigmas.shape) == [n + 1] and list(flux_scheduler.timesteps.shape) == [n]
        np.testing.assert_allclose(flux_scheduler.sigmas.numpy(), case["explicit_sigmas"]["sigmas"],
                                   rtol=0, atol=PARITY_ATOL)
        np.testing.assert_allclose(flux_scheduler.timesteps.numpy(), case["explicit_sigmas"]["timesteps"],
                                   rtol=0, atol=PARITY_ATOL)
        flux_scheduler.set_timesteps(num_inference_steps=n, mu=mu)
        np.testing.assert_allclose(flux_scheduler.sigmas.numpy(), case["default"]["sigmas"], rtol=0, atol=PARITY_ATOL)
        np.testing.assert_allclose(flux_scheduler.timesteps.numpy(), case["default"]["timesteps"],
                                   rtol=0, atol=PARITY_ATOL)


def test_static_shift_matches_diffusers(reference):
    scheduler = FlowMatchEulerDiscreteScheduler(**reference["static"]["config"])
    for case in reference["static"]["cases"]:
        scheduler.set_timesteps(num_inference_steps=case["num_inference_steps"])
        np.testing.assert_allclose(scheduler.sigmas.numpy(), case["sigmas"], rtol=0, atol=PARITY_ATOL)
        np.testing.assert_allclose(scheduler.timesteps.numpy(), case["timesteps"], rtol=0, atol=PARITY_ATOL)


def test_steps_match_diffusers(flux_scheduler, fixtures_dir):
    data = np.load(fixtures_dir / "scheduler" / "flow_match_euler_steps.npz")
    n = data["velocities"].shape[0]
    flux_scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=float(data["mu"]))
    np.testing.assert_allclose(flux_scheduler.timesteps.numpy(), data["timesteps"], rtol=0, atol=PARITY_ATOL)
    x = paddle.to_tensor(data["sample"])
    for i, t in enumerate(flux_scheduler.timesteps):
        x = flux_scheduler.step(paddle.to_tensor(data["velocities"][i]), t, x).prev_sample
        np.testing.assert_allclose(x.numpy(), data["outputs"][i], rtol=0, atol=PARITY_ATOL)
    assert flux_scheduler.step_index == n


def test_scheduler_rejects_bad_calls(flux_scheduler):
    with pytest.raises(ValueError, match="mu must be passed"):
        flux_scheduler.set_timesteps(num_inference_steps=4)
    with pytest.raises(ValueError, match="differs from len"):
        flux_scheduler.set_timesteps(num_inference_steps=3, sigmas=[1.0, 0.5], mu=1.0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        flux_scheduler.set_timesteps(sigmas=[1.0, 0.0], mu=1.0)
    with pytest.raises(ValueError, match="before step"):
        FlowMatchEulerDiscreteScheduler().step(paddle.zeros([1, 2]), 1000.0, paddle.zeros([1, 2]))
    flux_scheduler.set_timesteps(num_inference_steps=4, mu=1.0)
    with pytest.raises(ValueError, match="integer index"):
        flux_scheduler.step(paddle.zeros([1, 2]), 0, paddle.zeros([1, 2]))
    with pytest.raises(ValueError, match="not in the scheduler"):
        flux_scheduler.step(paddle.zeros([1, 2]), 123.456, paddle.zeros([1, 2]))


def test_set_shifted_sigmas_uses_phase_edges():
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0)
    edges = schedules.phase_sigmas(4, 100, 1.15)
    scheduler.set_shifted_sigmas(edges)
    np.testing.assert_allclose(scheduler.sigmas.numpy(), edges.numpy(), atol=0)
    np.testing.assert_allclose(scheduler.timesteps.numpy(), 1000 * edges.numpy()[:-1], rtol=1e-7)
    with pytest.raises(ValueError, match="strictly decrease"):
        scheduler.set_shifted_sigmas([0.5, 0.7, 0.0])


# ---------------------------------------------------------------------------------------------
# samplers
# ---------------------------------------------------------------------------------------------
def test_sample_euler_integrates_constant_velocity_exactly():
    x = paddle.to_tensor(np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32))
    v = paddle.to_tensor(np.random.default_rng(1).standard_normal((2, 3, 4)).astype(np.float32))
    seen = []

    def velocity_fn(sample, sigma):
        assert list(sigma.shape) == [2] and sigma.dtype == paddle.float32
        seen.append(sigma.numpy().copy())
        return v

    sigmas = schedules.phase_sigmas(4, 100, 1.15)
    out = sample_euler(velocity_fn, x, sigmas)
    np.testing.assert_allclose(out.numpy(), (x - v).numpy(), atol=1e-6)
    np.testing.assert_allclose(np.stack(seen)[:, 0], sigmas.numpy()[:-1], atol=0)


def test_sample_euler_follows_a_straight_path_to_its_end_point():
    # v(x, s) = (x - x0) / s is the exact velocity field of the straight paths into the point x0;
    # Euler steps are exact on straight lines, so any grid reaches x0 exactly
    x0 = paddle.to_tensor([[0.3, -1.2, 2.0]])
    noise = paddle.to_tensor([[1.5, 0.1, -0.7]])

    def velocity_fn(sample, sigma):
        return (sample - x0) / sigma.reshape([-1, 1])

    for sigmas in ([1.0, 0.0], [1.0, 0.6, 0.2, 0.0], schedules.solver_grid(28, 1.15).numpy()[::-1].copy()):
        np.testing.assert_allclose(sample_euler(velocity_fn, noise, sigmas).numpy(), x0.numpy(), atol=1e-5)
    # a partial grid stops on the path: x_s = (1 - s) x0 + s eps
    half = sample_euler(velocity_fn, noise, [1.0, 0.75, 0.5])
    np.testing.assert_allclose(half.numpy(), (0.5 * x0 + 0.5 * noise).numpy(), atol=1e-6)


def test_sample_euler_matches_scheduler_loop_and_calls_back(flux_scheduler):
    rng = np.random.default_rng(2)
    weight = paddle.to_tensor(rng.standard_normal((4, 4)).astype(np.float32) * 0.3)
    start = paddle.to_tensor(rng.standard_normal((2, 5, 4)).astype(np.float32))

    def velocity_fn(sample, sigma):
        return paddle.matmul(sample, weight) * (1 + sigma.reshape([-1, 1, 1]))

    flux_scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.25, 4), mu=1.15)
    x = start
    for t in flux_scheduler.timesteps:
        sigma = paddle.full([2], t.item() / 1000, dtype="float32")
        x = flux_scheduler.step(velocity_fn(x, sigma), t, x).prev_sample
    infos = []
    out = sample_euler(velocity_fn, start, flux_scheduler.sigmas, callback=infos.append)
    np.testing.assert_allclose(out.numpy(), x.numpy(), atol=1e-5)
    assert [info["i"] for info in infos] == [0, 1, 2, 3]
    assert set(infos[0]) == {"i", "sigma", "sigma_next", "x", "velocity", "denoised"}
    np.testing.assert_allclose(infos[-1]["x"].numpy(), out.numpy(), atol=0)


def test_sample_euler_rejects_bad_sigmas():
    x = paddle.zeros([1, 2])
    with pytest.raises(ValueError, match="strictly decrease"):
        sample_euler(lambda s, t: s, x, [0.5, 0.8])
    with pytest.raises(ValueError, match="at least 2"):
        sample_euler(lambda s, t: s, x, [1.0])
    with pytest.raises(ValueError, match="velocity has shape"):
        sample_euler(lambda s, t: paddle.zeros([1, 3]), x, [1.0, 0.0])


def test_few_step_sigmas_follow_the_requested_resolution():
    metadata = {"num_inference_steps": 4, "multiphase": 4, "num_euler_timesteps": 100, "guidance_scale": 3.5}
    at_1024 = few_step_sigmas(metadata, 1024, 1024)
    t = np.array([1.0, 0.75, 0.5, 0.25, 0.0])
    expected_1024 = np.where(t > 0, np.exp(1.15) / (np.exp(1.15) + (1 / np.maximum(t, 1e-12) - 1)), 0)
    np.testing.assert_allclose(at_1024.numpy(), expected_1024, atol=1e-7)
    mu_512 = 0.5 + 0.65 * (1024 - 256) / 3840
    at_512 = few_step_sigmas(metadata, 512, 512)
    expected_512 = np.where(t > 0, np.exp(mu_512) / (np.exp(mu_512) + (1 / np.maximum(t, 1e-12) - 1)), 0)
    np.testing.assert_allclose(at_512.numpy(), expected_512, atol=1e-7)
    assert at_512[2].item() < at_1024[2].item()
    lcm = few_step_sigmas({"num_inference_steps": 1, "multiphase": 1, "num_euler_timesteps": 50}, 768, 1360)
    np.testing.assert_allclose(lcm.numpy(), [1.0, 0.0])
    as_strings = few_step_sigmas({"num_inference_steps": "4", "multiphase": "4", "num_euler_timesteps": "100"},
                                 1024, 1024)
    np.testing.assert_allclose(as_strings.numpy(), at_1024.numpy(), atol=0)


def test_few_step_sigmas_rejects_bad_metadata():
    good = {"num_inference_steps": 4, "multiphase": 4, "num_euler_timesteps": 100}
    with pytest.raises(KeyError, match="multiphase"):
        few_step_sigmas({"num_inference_steps": 4, "num_euler_timesteps": 100}, 1024, 1024)
    with pytest.raises(ValueError, match="must equal multiphase"):
        few_step_sigmas({**good, "num_inference_steps": 8}, 1024, 1024)
    with pytest.raises(ValueError, match="positive integer"):
        few_step_sigmas({**good, "num_euler_timesteps": 0}, 1024, 1024)
    with pytest.raises(ValueError, match="multiple of 16"):
        few_step_sigmas(good, 1000, 1024)


def test_euler_update_by_hand_and_its_output_dtype():
    x = paddle.to_tensor([[1.0, 2.0]])
    v = paddle.to_tensor([[0.5, -1.0]])
    # x + (0.3 - 0.8) v = [1 - 0.25, 2 + 0.5]
    np.testing.assert_allclose(euler_update(x, 0.8, 0.3, v).numpy(), [[0.75, 2.5]], atol=1e-7)
    assert euler_update(x, 0.8, 0.3, v, out_dtype="float64").dtype == paddle.float64
    with pytest.raises(ValueError, match="velocity has shape"):
        euler_update(x, 0.8, 0.3, paddle.zeros([1, 3]))


def test_sample_euler_with_one_grid_per_sample_equals_separate_runs():
    rng = np.random.default_rng(3)
    weight = paddle.to_tensor(rng.standard_normal((4, 4)).astype(np.float32) * 0.3)
    start = paddle.to_tensor(rng.standard_normal((2, 5, 4)).astype(np.float32))
    seen = []

    def velocity_fn(sample, sigma):
        seen.append(sigma.numpy().copy())
        return paddle.matmul(sample, weight) * (1 + sigma.reshape([-1, 1, 1]))

    grids = paddle.to_tensor([[0.9, 0.6], [0.7, 0.5], [0.4, 0.2]])  # [n + 1, B]: column b is sample b's grid
    together = sample_euler(velocity_fn, start, grids).numpy()
    np.testing.assert_allclose(np.stack(seen), grids.numpy()[:-1], atol=0)  # each sample at its own level
    for b in range(2):
        alone = sample_euler(velocity_fn, start[b:b + 1], grids.numpy()[:, b]).numpy()
        np.testing.assert_allclose(together[b:b + 1], alone, atol=1e-6)
    with pytest.raises(ValueError, match="strictly decrease"):
        sample_euler(velocity_fn, start, paddle.to_tensor([[0.9, 0.6], [0.7, 0.7]]))
