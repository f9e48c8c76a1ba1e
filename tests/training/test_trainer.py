"""The generic trainer on a two-group toy: update schedule, gradient isolation, accumulation, clipping,
learning-rate schedules, the NaN stop."""
import math

import numpy as np
import paddle
import pytest
from training_toys import DictStream, TwoGroupToy, latent_stream, stack_dicts, tiny_pcm, toy_arrays

from ppdiffusers_fast.training import checkpoint as ckpt
from ppdiffusers_fast.training.logging import NonFiniteLossError, NonFiniteWeightsError
from ppdiffusers_fast.training.config import OptimConfig, train_config
from ppdiffusers_fast.training.optim import OptimizerSettings, clip_grad_norm, lr_multiplier
from ppdiffusers_fast.training.trainer import Trainer


def _settings(tmp_path, steps, **kw):
    kw.setdefault("learning_rate", 0.01)
    kw.setdefault("adam_weight_decay", 0.0)
    kw.setdefault("resume_from_checkpoint", None)
    return train_config(output_dir=str(tmp_path), max_train_steps=steps, report_to="none",
                        checkpointing_steps=kw.pop("checkpointing_steps", 100), **kw)


def _toy(seed=0, **kw):
    paddle.seed(seed)
    return TwoGroupToy(**kw)


def _values(layer):
    return [p.numpy().copy() for p in layer.parameters()]


def test_update_schedule_steps_only_scheduled_groups(tmp_path):
    method = _toy()
    trainer = Trainer(method, DictStream(toy_arrays(), 4), _settings(tmp_path, 4))
    before = _values(method.generator)
    trainer._build_optimizers()
    trainer.step = 1  # an odd step updates only the critic
    losses, _ = trainer._run_micro_batches(["critic"])
    trainer._update(["critic"])
    assert set(losses) == {"critic"}
    for a, b in zip(before, _values(method.generator)):
        np.testing.assert_array_equal(a, b)

    method = _toy()
    result = Trainer(method, DictStream(toy_arrays(), 4), _settings(tmp_path / "run", 4)).train()
    assert result.step == 4
    assert method.updates == [(0, ("generator", "critic")), (1, ("critic",)), (2, ("generator", "critic")),
                              (3, ("critic",))]


def test_backward_reaches_only_the_result_group(tmp_path):
    method = _toy()
    trainer = Trainer(method, DictStream(toy_arrays(), 4), _settings(tmp_path, 1))
    trainer._build_optimizers()
    batch = stack_dicts(toy_arrays()[:4])
    critic_result, generator_result = method.train_step(batch, 0)
    trainer._backward(critic_result.total(), "critic")
    critic_grads = [p.grad.numpy().copy() for p in method.critic.parameters()]
    assert all(p.grad is None for p in method.generator.parameters())
    # the generator loss flows through the critic, but must not change the critic's gradients
    trainer._backward(generator_result.total(), "generator")
    for saved, p in zip(critic_grads, method.critic.parameters()):
        np.testing.assert_array_equal(saved, p.grad.numpy())
    assert all(p.grad is not None and np.abs(p.grad.numpy()).sum() > 0 for p in method.generator.parameters())


def test_gradient_accumulation_equals_the_large_batch(tmp_path):
    big, small = _toy(), _toy()
    Trainer(big, DictStream(toy_arrays(), 4), _settings(tmp_path / "a", 3)).train()
    Trainer(small, DictStream(toy_arrays(), 2), _settings(tmp_path / "b", 3, gradient_accumulation_steps=2)).train()
    for a, b in zip(big.parameters(), small.parameters()):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)


def test_clip_grad_norm_matches_numpy():
    params = [paddle.create_parameter([3, 2], "float32"), paddle.create_parameter([4], "float32")]
    grads = [np.arange(6, dtype="float32").reshape(3, 2), -np.ones(4, dtype="float32")]
    for p, g in zip(params, grads):
        p.grad = paddle.to_tensor(g)
    expected_norm = math.sqrt(sum((g.astype("float64") ** 2).sum() for g in grads))
    norm = clip_grad_norm(params, 1.0)
    assert norm == pytest.approx(expected_norm, rel=1e-6)
    clipped = math.sqrt(sum((p.grad.numpy().astype("float64") ** 2).sum() for p in params))
    assert clipped == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(params[0].grad.numpy(), grads[0] / (expected_norm + 1e-6), rtol=1e-6)
    assert clip_grad_norm(params, 0.0) == pytest.approx(clipped, rel=1e-6)  # 0 = measure only


@pytest.mark.parametrize("name, step, expected", [
    ("constant", 0, 1.0), ("constant", 7, 1.0),
    ("constant_with_warmup", 0, 0.0), ("constant_with_warmup", 2, 0.5), ("constant_with_warmup", 9, 1.0),
    ("linear", 2, 0.5), ("linear", 4, 1.0), ("linear", 8, 0.5), ("linear", 12, 0.0),
    ("cosine", 8, 0.5), ("cosine", 12, 0.0), ("cosine", 6, 0.5 * (1 + math.cos(math.pi / 4))),
    ("cosine_with_restarts", 8, 1.0), ("cosine_with_restarts", 6, 0.5),
    ("polynomial", 8, (1 - 1e-7 / 0.01) * 0.25 + 1e-7 / 0.01),
])
def test_lr_multiplier_by_hand(name, step, expected):
    optim = OptimConfig(learning_rate=0.01, lr_scheduler=name, lr_warmup_steps=4, lr_num_cycles=2, lr_power=2.0)
    settings = OptimizerSettings.from_config(optim, total_steps=12)
    assert lr_multiplier(step, settings) == pytest.approx(expected, abs=1e-12)


def test_trainer_logs_the_scheduled_learning_rate(tmp_path):
    settings = _settings(tmp_path, 4, lr_scheduler="constant_with_warmup", lr_warmup_steps=2, adam_weight_decay=1e-3)
    trainer = Trainer(_toy(), DictStream(toy_arrays(), 4), settings)
    trainer.train()
    generator_lrs = [row.get("lr/generator") for row in trainer.history]
    critic_lrs = [row["lr/critic"] for row in trainer.history]
    assert generator_lrs == [pytest.approx(0.0), None, pytest.approx(0.01), None]
    assert critic_lrs == [pytest.approx(0.0), pytest.approx(0.025), pytest.approx(0.05), pytest.approx(0.05)]
    assert all(row["time/samples_per_second"] > 0 for row in trainer.history)


def test_nan_loss_stops_with_its_name_and_writes_no_checkpoint(tmp_path):
    method = _toy(nan_at_step=2)
    trainer = Trainer(method, DictStream(toy_arrays(), 4), _settings(tmp_path, 6, checkpointing_steps=1))
    with pytest.raises(NonFiniteLossError, match=r"loss 'generator' is nan at step 2"):
        trainer.train()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-2"]
    saved = ckpt.load_trainable(tmp_path / "checkpoint-2")
    for name, param in method.checkpoint_tensors().items():  # the NaN step updated nothing
        np.testing.assert_array_equal(saved[name], param.numpy())


def test_non_finite_weights_stop_training_and_are_never_saved(tmp_path):
    """A finite loss with an update that overflows (lr 1e39): stop at that step with its loss, write nothing."""
    method = tiny_pcm()
    trainer = Trainer(method, latent_stream(), train_config(
        output_dir=str(tmp_path), max_train_steps=3, checkpointing_steps=1, learning_rate=1e39,
        report_to="none", resume_from_checkpoint=None))
    with pytest.raises(NonFiniteWeightsError, match=r"the update at step 0 made \d+ tensors .*NaN or infinite "
                                                    r"\(losses at that step: pcm [0-9.e-]+\)"):
        trainer.train()
    assert ckpt.list_checkpoints(tmp_path) == []
    assert not list(tmp_path.glob("checkpoint-*")) and not list(tmp_path.glob(ckpt.TEMP_PREFIX + "*"))


def test_checkpoint_write_refuses_non_finite_tensors(tmp_path):
    method = tiny_pcm()
    trainer = Trainer(method, latent_stream(), train_config(
        output_dir=str(tmp_path), max_train_steps=1, learning_rate=1e-3, report_to="none",
        resume_from_checkpoint=None))
    trainer.train()
    name, param = next(iter(method.checkpoint_tensors().items()))
    param.set_value(paddle.full(param.shape, float("nan"), param.dtype))
    trainer.step = 2
    with pytest.raises(RuntimeError, match=f"refusing to write checkpoint-2: trainable.safetensors would hold NaN "
                                           f"or infinite values in 1 tensor \\({name}\\)"):
        trainer.save_checkpoint()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-1"]
    assert not list(tmp_path.glob(ckpt.TEMP_PREFIX + "*"))


def test_plain_text_log_has_step_losses_lr_and_grad_norm(tmp_path):
    trainer = Trainer(_toy(), DictStream(toy_arrays(), 4), _settings(tmp_path, 3))
    trainer.train()
    lines = [line for line in (tmp_path / "train_log.txt").read_text().splitlines() if line.startswith("step ")]
    assert [line.split()[:2] for line in lines] == [["step", "1"], ["step", "2"], ["step", "3"]]
    first = dict(item.split("=") for item in lines[0].split()[2:])
    row = trainer.history[0]
    assert set(first) == {"loss/generator", "loss/critic", "lr/generator", "lr/critic", "grad_norm/generator",
                          "grad_norm/critic"}
    for key, value in first.items():
        assert float(value) == pytest.approx(row[key], rel=1e-5), key
