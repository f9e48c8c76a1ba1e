"""PCM on a tiny FLUX: targets by hand (boundary condition, phases, teacher sub-steps, CFG), which adapters are
live in each forward, which parameters train, gradient checkpointing, and that the loss decreases."""
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "training"))
from training_toys import TINY_LORA, latent_stream, tiny_flux, tiny_pcm  # noqa: E402

from ppdiffusers_fast import schedules  # noqa: E402
from ppdiffusers_fast.methods.denoiser import FluxCondition, FluxDenoiser  # noqa: E402
from ppdiffusers_fast.methods.base import STUDENT, FewStepSchedule  # noqa: E402
from ppdiffusers_fast.methods.pcm import EMA_TARGET, PCM, PCMConfig  # noqa: E402
from ppdiffusers_fast.models.lora import adapter_parameters, record_live_adapters, use_adapters  # noqa: E402
from ppdiffusers_fast.training.config import train_config  # noqa: E402
from ppdiffusers_fast.training.trainer import Trainer  # noqa: E402


def _batch(batch_size=3, seed=1):
    stream = latent_stream(num_samples=batch_size, batch_size=batch_size, seed=seed)
    return next(stream)


@paddle.no_grad()
def _perturb_student(method, scale=0.3, seed=5):
    """Give the student a non-zero update so that student and teacher differ."""
    paddle.seed(seed)
    for p in adapter_parameters(method.denoiser.transformer, STUDENT):
        p.set_value(paddle.randn(p.shape) * scale)


def _velocity(method, x, sigma, cond, adapters, guidance=3.5):
    with use_adapters(method.denoiser.transformer, *adapters):
        return method.denoiser(x, sigma, cond.with_guidance(guidance)).numpy()


def test_targets_by_hand_boundary_and_inner_indices():
    method = tiny_pcm(num_euler_timesteps=8, multiphase=2)  # edges [0, 4, 8]
    _perturb_student(method)
    batch = _batch()
    index = paddle.to_tensor([1, 5, 3], dtype="int64")  # boundary (0), boundary (4), inner (phase edge 0)
    noise = paddle.randn(batch.latents.shape)
    pair = method.consistency_pair(batch.latents, noise, index, batch.cond)
    prediction, target = pair.prediction, pair.target
    assert pair.at_boundary.numpy().tolist() == [True, True, False]

    mu = schedules.resolution_mu(batch.latents.shape[1])
    grid = schedules.time_shift(np.arange(9, dtype=np.float64) / 8, mu)
    i = np.array([1, 5, 3])
    edge = np.array([0, 4, 0])
    x0, eps = batch.latents.numpy().astype(np.float64), noise.numpy().astype(np.float64)
    s, s_prev, s_edge = grid[i][:, None, None], grid[i - 1][:, None, None], grid[edge][:, None, None]
    x_t = (1 - s) * x0 + s * eps
    as_tensor = lambda a: paddle.to_tensor(a.astype("float32"))  # noqa: E731
    sig = lambda a: paddle.to_tensor(a.reshape(-1).astype("float32"))  # noqa: E731
    v_student = _velocity(method, as_tensor(x_t), sig(s), batch.cond, [STUDENT])
    np.testing.assert_allclose(prediction.numpy(), x_t + (s_edge - s) * v_student, atol=1e-5)
    # what the prediction was built from, and the student's clean sample x_i - sigma_i v from the same pass
    np.testing.assert_array_equal(pair.lower.numpy(), edge)
    np.testing.assert_array_equal(pair.upper.numpy(), [4, 8, 4])
    np.testing.assert_allclose(pair.sigma.numpy(), grid[i], rtol=1e-6)
    np.testing.assert_allclose(pair.sigma_edge.numpy(), grid[edge], rtol=1e-6)
    np.testing.assert_allclose(pair.grid.numpy(), grid, rtol=1e-6)
    np.testing.assert_allclose(pair.x_t.numpy(), x_t, atol=1e-5)
    np.testing.assert_allclose(pair.student_velocity.numpy(), v_student, atol=1e-5)
    np.testing.assert_allclose(pair.student_x0.numpy(), x_t - s * v_student, rtol=1e-5, atol=2e-5)
    phase_0 = edge == 0  # sigma_{e_0} = 0: the jump lands on the clean sample
    np.testing.assert_allclose(pair.student_x0.numpy()[phase_0], prediction.numpy()[phase_0], atol=1e-6)

    v_teacher = _velocity(method, as_tensor(x_t), sig(s), batch.cond, [])
    x_prev = x_t + (s_prev - s) * v_teacher
    v_target = _velocity(method, as_tensor(x_prev), sig(s_prev), batch.cond, [STUDENT])
    expected = x_prev + (s_edge - s_prev) * v_target
    expected[:2] = x_prev[:2]  # boundary condition: the teacher's step itself
    np.testing.assert_allclose(target.numpy(), expected, atol=1e-5)
    assert np.abs(target.numpy()[2] - x_prev[2]).max() > 1e-3  # the inner target is not the teacher step


def test_lcm_is_one_phase_and_several_teacher_substeps_are_euler_steps():
    method = tiny_pcm(num_euler_timesteps=4, multiphase=1, num_teacher_steps=2)
    assert method.edges == [0, 4]
    batch = _batch(2)
    index = paddle.to_tensor([1, 3], dtype="int64")
    noise = paddle.randn(batch.latents.shape)
    pair = method.consistency_pair(batch.latents, noise, index, batch.cond)
    target = pair.target
    assert pair.at_boundary.numpy().tolist() == [True, False]

    grid = schedules.time_shift(np.arange(5, dtype=np.float64) / 4, schedules.resolution_mu(4))
    s, s_prev = grid[[1, 3]][:, None, None], grid[[0, 2]][:, None, None]
    x = (1 - s) * batch.latents.numpy() + s * noise.numpy()
    mid = (s + s_prev) / 2
    sig = lambda a: paddle.to_tensor(a.reshape(-1).astype("float32"))  # noqa: E731
    x_half = x + (mid - s) * _velocity(method, paddle.to_tensor(x.astype("float32")), sig(s), batch.cond, [])
    x_prev = x_half + (s_prev - mid) * _velocity(method, paddle.to_tensor(x_half.astype("float32")), sig(mid),
                                                 batch.cond, [])
    np.testing.assert_allclose(target.numpy()[0], x_prev[0], atol=1e-5)


def test_teacher_has_no_adapter_live_and_target_uses_student_or_ema():
    method = tiny_pcm(num_teacher_steps=2)
    with record_live_adapters(method.denoiser.transformer) as record:
        method.train_step(_batch(), 0)
    assert record == [(STUDENT,), (), (), (STUDENT,)]  # student, two teacher sub-steps, stop-gradient target

    ema_method = tiny_pcm(ema_decay=0.9)
    with record_live_adapters(ema_method.denoiser.transformer) as record:
        ema_method.train_step(_batch(), 0)
    assert record == [(STUDENT,), (), (EMA_TARGET,)]


def test_cfg_teacher_guides_with_the_unconditional_embedding():
    transformer = tiny_flux(guidance_embeds=False)
    batch = _batch(2)
    uncond = FluxCondition(paddle.zeros([1, 6, 32]), paddle.zeros([1, 32]), batch.cond.txt_ids, batch.cond.img_ids)
    with pytest.raises(ValueError, match="unconditional"):
        PCM(FluxDenoiser(transformer), TINY_LORA, FewStepSchedule(num_euler_timesteps=8, multiphase=2))
    method = PCM(FluxDenoiser(tiny_flux(guidance_embeds=False)), TINY_LORA,
                 FewStepSchedule(num_euler_timesteps=8, multiphase=2, guidance_scale=4.0), unconditional=uncond)
    assert method.guidance_mode == "cfg"
    x = paddle.randn(batch.latents.shape)
    sigma = paddle.to_tensor([0.7, 0.4])
    with record_live_adapters(method.denoiser.transformer) as record:
        x_next = method.teacher_solve(x, sigma, sigma - 0.1, batch.cond)
    assert record == [()]  # one pass over the doubled batch, no adapter
    with use_adapters(method.denoiser.transformer):
        v_cond = method.denoiser(x, sigma, batch.cond).numpy()
        v_uncond = method.denoiser(x, sigma, uncond.expand_to(2)).numpy()
    expected = x.numpy() - 0.1 * (v_uncond + 4.0 * (v_cond - v_uncond))
    np.testing.assert_allclose(x_next.numpy(), expected, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        method = tiny_pcm(seed=0)
        _perturb_student(method)
        if checkpointing:
            method.denoiser.enable_gradient_checkpointing()
        method.train()
        paddle.seed(3)
        result = method.train_step(_batch(), 0)
        result.total().backward()  # outside the method's use_adapters blocks, as the trainer does
        grads.append([p.grad.numpy() for p in method.parameter_groups()["generator"]])
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert max(np.abs(g).max() for g in grads[1]) > 0


def _base_and_adapters(method):
    student = {id(p) for p in adapter_parameters(method.denoiser.transformer, STUDENT)}
    ema = {id(p) for p in adapter_parameters(method.denoiser.transformer, EMA_TARGET)}
    named = dict(method.named_parameters())
    base = {n: p.numpy().copy() for n, p in named.items() if id(p) not in student | ema}
    return base, student, ema, named


def test_only_the_student_adapter_trains(tmp_path):
    method = tiny_pcm(ema_decay=0.5)
    base_before, student_ids, ema_ids, named = _base_and_adapters(method)
    ema_before = {n: p.numpy().copy() for n, p in named.items() if id(p) in ema_ids}
    assert {id(p) for p in method.parameter_groups()["generator"]} == student_ids
    assert all(p.stop_gradient for n, p in named.items() if id(p) not in student_ids)
    settings = train_config(output_dir=str(tmp_path), max_train_steps=3, report_to="none", seed=0,
                            learning_rate=1e-2, resume_from_checkpoint=None)
    trainer = Trainer(method, latent_stream(), settings)
    trainer.train()
    for name, value in base_before.items():
        np.testing.assert_array_equal(value, named[name].numpy(), err_msg=name)
    student_b = [p for n, p in named.items() if id(p) in student_ids and n.endswith("lora_B")]
    assert max(np.abs(p.numpy()).max() for p in student_b) > 1e-3
    ema_b_moved = [np.abs(named[n].numpy() - v).max() for n, v in ema_before.items() if n.endswith("lora_B")]
    assert max(ema_b_moved) > 0  # the EMA follows the student
    optimized = {id(p) for p in trainer.optimizers["generator"].params.values()}
    assert optimized == student_ids


@pytest.mark.parametrize("loss_type, max_ratio", [("l2", 0.75), ("huber", 0.98)])
def test_pcm_loss_decreases_on_a_tiny_teacher(tmp_path, loss_type, max_ratio):
    """Held-out loss (fixed batch, fixed index and noise draws) before vs after 150 updates."""
    method = tiny_pcm(num_euler_timesteps=8, multiphase=2, loss_type=loss_type)
    evaluation = _batch(8, seed=2)

    def held_out_loss():
        losses = []
        for seed in range(8):
            paddle.seed(100 + seed)
            with paddle.no_grad():
                losses.append(method.train_step(evaluation, 0).losses["pcm"].item())
        return float(np.mean(losses))

    before = held_out_loss()
    settings = train_config(output_dir=str(tmp_path), max_train_steps=150, report_to="none", seed=0,
                            checkpointing_steps=1000, learning_rate=1e-2, resume_from_checkpoint=None)
    trainer = Trainer(method, latent_stream(num_samples=8, batch_size=4, seed=2), settings)
    trainer.train()
    after = held_out_loss()
    assert after < max_ratio * before, (before, after)
    first = np.mean([row["loss/pcm"] for row in trainer.history[:30]])
    last = np.mean([row["loss/pcm"] for row in trainer.history[-30:]])
    assert last < first


def test_pcm_takes_the_shared_schedule_and_its_own_config():
    denoiser = FluxDenoiser(tiny_flux())
    with pytest.raises(TypeError, match="FewStepSchedule"):
        PCM(denoiser, TINY_LORA, PCMConfig())  # the PCM-only settings in place of the schedule
    method = PCM(denoiser, TINY_LORA, FewStepSchedule(num_euler_timesteps=6, multiphase=3, guidance_scale=2.0))
    assert method.edges == [0, 2, 4, 6] and method.config == PCMConfig()
    assert method.sampling_metadata() == {"num_inference_steps": 3, "multiphase": 3, "num_euler_timesteps": 6,
                                          "guidance_scale": 2.0, "lora_scale": 1.0}


def test_config_errors_name_the_flag():
    with pytest.raises(ValueError, match="--multiphase"):
        FewStepSchedule(num_euler_timesteps=4, multiphase=5).validate()
    with pytest.raises(ValueError, match="--ema_decay"):
        PCMConfig(ema_decay=1.5).validate()
    with pytest.raises(ValueError, match="not_apply_cfg_solver"):
        tiny_pcm(apply_cfg_solver=False)


def test_ema_adapter_is_float32_on_a_bf16_base_and_tracks_the_student():
    """decay 0.999 over 300 updates toward a fixed student: the EMA must reach 1 - 0.999^300 = 25.9% of the way
    (a bf16 EMA stalls: its (1 - decay) steps round away)."""
    transformer = tiny_flux(0).to(dtype="bfloat16")
    method = PCM(FluxDenoiser(transformer), TINY_LORA, FewStepSchedule(num_euler_timesteps=8, multiphase=2),
                 PCMConfig(ema_decay=0.999))
    ema = adapter_parameters(transformer, EMA_TARGET)
    students = adapter_parameters(transformer, STUDENT)
    assert {str(p.dtype) for p in students} == {"paddle.bfloat16"}
    assert {str(p.dtype) for p in ema} == {"paddle.float32"}
    start = [p.numpy().copy() for p in ema]
    rng = np.random.RandomState(0)
    for student in students:  # a student far from the EMA's start
        student.set_value(paddle.to_tensor(rng.randn(*student.shape).astype("float32")).astype("bfloat16"))
    for step in range(300):
        method.after_update(step, ["generator"])
    for e, s, e0 in zip(ema, students, start):
        target = s.astype("float32").numpy().astype(np.float64)
        expected = target + (e0 - target) * 0.999 ** 300
        np.testing.assert_allclose(e.numpy(), expected, rtol=1e-3, atol=1e-4)
