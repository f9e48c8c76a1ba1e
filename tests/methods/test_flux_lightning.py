"""FLUX-Lightning: a composition of PCM with switchable, weighted adversarial / DMD / reflow parts; an
explicit update schedule; each parameter group updated only by its own losses; the exported LoRA."""
import numpy as np
import paddle
import pytest
from lightning_toys import (base_parameters, changed, group_values, groups_reached, randomize_adapters,
                            run_trainer, tiny_batch, tiny_flux, tiny_flux_lightning)

from ppdiffusers_fast import schedules
from ppdiffusers_fast.methods.distribution_matching import FAKE_SCORE_ADAPTER
from ppdiffusers_fast.methods.flux_lightning import LORA_FILE
from ppdiffusers_fast.models.lora import adapter_parameters, live_adapters
from ppdiffusers_fast.models.lora_io import load_lora


def _randomized(**kw):
    method = tiny_flux_lightning(**kw)
    names = ["student"] + ([FAKE_SCORE_ADAPTER] if method.trains_fake_score else [])
    randomize_adapters(method.pcm.denoiser, names)
    return method


def test_with_every_part_off_it_is_pcm():
    method = _randomized(adv=False, dmd=False, reflow=False)
    batch = tiny_batch()
    assert sorted(method.parameter_groups()) == ["generator"]
    assert [method.update_schedule(s) for s in range(3)] == [["generator"]] * 3
    paddle.seed(11)
    (result,) = method.train_step(batch, 0)
    paddle.seed(11)
    reference = method.pcm.train_step(batch, 0)
    assert list(result.losses) == ["pcm"]
    np.testing.assert_allclose(result.losses["pcm"].item(), reference.losses["pcm"].item(), rtol=1e-6)


def test_generator_loss_is_the_weighted_sum_of_the_parts():
    method = _randomized(adv_kw={}, dmd_kw={"dmd_weight": 0.2}, reflow_kw={"reflow_loss_weight": 0.3})
    method.adv_config.adv_weight = 0.5
    generator, discriminator = method.train_step(tiny_batch(), 0)
    assert (generator.group, discriminator.group) == ("generator", "discriminator")
    assert list(generator.losses) == ["pcm", "adv_g", "dmd", "reflow"]
    assert list(discriminator.losses) == ["adv_d"]
    for name, weight in (("adv_g", 0.5), ("dmd", 0.2), ("reflow", 0.3)):
        np.testing.assert_allclose(generator.losses[name].item(), weight * generator.metrics[f"{name}_unweighted"],
                                   rtol=1e-6)
        assert generator.metrics[f"{name}_unweighted"] > 0
    total = sum(v.item() for v in generator.losses.values())
    np.testing.assert_allclose(generator.total().item(), total, rtol=1e-6)


def test_reference_defaults_and_switches():
    method = tiny_flux_lightning()
    assert (method.adv_config.adv_weight, method.dmd_config.dmd_weight, method.reflow_config.reflow_loss_weight) == \
        (0.1, 0.01, 0.01)
    assert method.dmd_config.dmd_fake_score == "student" and not method.trains_fake_score
    assert sorted(method.parameter_groups()) == ["discriminator", "generator"]
    assert method.group_hyperparameters() == {"discriminator": {"learning_rate": 1e-5, "beta1": 0.0,
                                                                "beta2": 0.999, "max_grad_norm": 1.0}}
    (generator,) = [r for r in tiny_flux_lightning(adv=False, reflow=False).train_step(tiny_batch(), 0)]
    assert list(generator.losses) == ["pcm", "dmd"]
    with pytest.raises(ValueError, match="--reflow_loss_weight"):  # a switched-off part's flags are checked too
        tiny_flux_lightning(reflow=False, reflow_kw={"reflow_loss_weight": -1.0})


def test_update_schedules_are_explicit():
    def schedule(method, steps=4):
        return [method.update_schedule(s) for s in range(steps)]

    assert schedule(tiny_flux_lightning()) == [["generator", "discriminator"]] * 4
    assert schedule(tiny_flux_lightning(adv_kw={"adv_alternate": True})) == \
        [["generator"], ["discriminator"], ["generator"], ["discriminator"]]
    adapter = tiny_flux_lightning(fake_score="adapter", dmd_kw={"dmd_fake_score_updates": 3})
    assert schedule(adapter) == [["generator", "discriminator", "fake_score"], ["discriminator", "fake_score"],
                                 ["discriminator", "fake_score"], ["generator", "discriminator", "fake_score"]]
    both = tiny_flux_lightning(fake_score="adapter", adv_kw={"adv_alternate": True}, dmd_kw={"dmd_fake_score_updates": 3})
    assert schedule(both) == [["generator", "fake_score"], ["discriminator", "fake_score"],
                              ["discriminator", "fake_score"], ["generator", "fake_score"]]


def test_each_result_reaches_only_its_group():
    method = _randomized(fake_score="adapter", dmd_kw={"dmd_fake_score_updates": 2})
    results = {r.group: r for r in method.train_step(tiny_batch(), 0)}
    assert sorted(results) == ["discriminator", "fake_score", "generator"]
    assert groups_reached(method, results["discriminator"]) == {"discriminator"}
    assert groups_reached(method, results["fake_score"]) == {"fake_score"}
    # the generator's adversarial loss flows through the heads too: the trainer discards those gradients
    assert groups_reached(method, results["generator"]) == {"generator", "discriminator"}
    assert all(p.grad is None for p in base_parameters(method.pcm.denoiser))


def test_trainer_updates_each_group_and_never_the_base(tmp_path):
    method = _randomized(fake_score="adapter", dmd_kw={"dmd_fake_score_updates": 2})
    base = [p.numpy().copy() for p in base_parameters(method.pcm.denoiser)]
    before = group_values(method)
    result = run_trainer(method, tiny_batch(), tmp_path, steps=1)
    assert result.step == 1 and set(result.losses) == {"pcm", "adv_g", "dmd", "reflow", "adv_d", "fake_score"}
    assert changed(before, group_values(method)) == {"generator": True, "discriminator": True, "fake_score": True}
    assert all(np.array_equal(a, p.numpy()) for a, p in zip(base, base_parameters(method.pcm.denoiser)))


def test_trainer_discriminator_step_leaves_the_student_alone(tmp_path):
    method = _randomized(adv_kw={"adv_alternate": True})
    run_trainer(method, tiny_batch(), tmp_path / "first", steps=1)  # step 0: generator only
    after_generator = group_values(method)
    method.update_schedule = lambda step: ["discriminator"]  # the schedule's step 1, run as a fresh run's step 0
    run_trainer(method, tiny_batch(), tmp_path / "second", steps=1)
    assert changed(after_generator, group_values(method)) == {"generator": False, "discriminator": True}


def test_discriminator_step_runs_the_student_without_a_graph():
    method = _randomized(adv_kw={"adv_alternate": True})
    transformer = method.pcm.denoiser.transformer
    calls = []
    hook = transformer.register_forward_pre_hook(
        lambda layer, inputs: calls.append((live_adapters(transformer), paddle.is_grad_enabled())))
    results = method.train_step(tiny_batch(), 1)
    hook.remove()
    assert [r.group for r in results] == ["discriminator"]
    student_calls = [grad for live, grad in calls if live == ("student",)]
    assert student_calls and not any(student_calls)
    assert ((), True) not in calls  # no backbone pass keeps a graph either


def test_checkpoint_tensors_and_export(tmp_path):
    method = _randomized()
    tensors = method.checkpoint_tensors()
    assert any(name.startswith("adversarial.heads.") for name in tensors)
    assert any(".lora_adapters.student." in name for name in tensors)
    method.load_checkpoint_tensors({name: t.numpy() * 0 + 0.5 for name, t in tensors.items()})
    assert all(np.all(t.numpy() == 0.5) for t in method.checkpoint_tensors().values())

    path = method.export(str(tmp_path))
    assert path.endswith(LORA_FILE)
    fresh = tiny_flux(seed=3)
    info = load_lora(fresh, path, "student")
    assert info["sampling"] == {"num_inference_steps": 2, "multiphase": 2, "num_euler_timesteps": 8,
                                "guidance_scale": 3.5, "lora_scale": 1.0}
    for a, b in zip(adapter_parameters(fresh, "student"), adapter_parameters(method.pcm.denoiser.transformer, "student")):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    sigmas = method.pcm.sampling_sigmas(8).numpy()
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and len(sigmas) == 3
    assert schedules.phase_edge_indices(8, 2) == method.pcm.edges


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        method = _randomized(fake_score="adapter", dmd_kw={"dmd_fake_score_updates": 1})
        if checkpointing:
            method.pcm.denoiser.enable_gradient_checkpointing()
        method.train()
        paddle.seed(21)
        results = method.train_step(tiny_batch(), 0)
        per_group = {}
        for result in results:
            params = method.parameter_groups()[result.group]
            for p in params:
                p.clear_gradient(set_to_zero=False)
            result.total().backward()
            per_group[result.group] = [p.grad.numpy().copy() for p in params if p.grad is not None]
        grads.append(per_group)
    assert sorted(grads[0]) == ["discriminator", "fake_score", "generator"]
    for group in grads[0]:
        assert len(grads[0][group]) == len(grads[1][group]) > 0
        for plain, recomputed in zip(grads[0][group], grads[1][group]):
            np.testing.assert_allclose(recomputed, plain, rtol=1e-4, atol=1e-6)
