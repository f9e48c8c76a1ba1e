"""Resume is exact: N updates in one run equal N/2 updates, a stop, and a resumed run of N/2 more."""
import numpy as np
import paddle
from training_toys import DictStream, TwoGroupToy, latent_stream, tiny_pcm, toy_arrays

from ppdiffusers_fast.training import checkpoint as ckpt
from ppdiffusers_fast.training.config import train_config
from ppdiffusers_fast.training.optim import optimizer_state_arrays
from ppdiffusers_fast.training.trainer import Trainer

STEPS = 6


def _pcm_trainer(output_dir, steps, resume=None):
    method = tiny_pcm(ema_decay=0.9)  # a fresh process would rebuild the same base and initial adapter
    method.denoiser.enable_gradient_checkpointing()
    settings = train_config(
        output_dir=str(output_dir), max_train_steps=steps, gradient_accumulation_steps=2, checkpointing_steps=2,
        resume_from_checkpoint=resume, seed=11, report_to="none", learning_rate=5e-3,
        lr_scheduler="constant_with_warmup", lr_warmup_steps=2, max_grad_norm=0.05)
    return Trainer(method, latent_stream(num_samples=6, batch_size=1), settings)


def _state(trainer):
    tensors = {n: t.numpy().copy() for n, t in trainer.method.checkpoint_tensors().items()}
    optimizers = {g: optimizer_state_arrays(o)[0] for g, o in trainer.optimizers.items()}
    return tensors, optimizers


def _assert_same(a, b, atol=1e-6):
    tensors_a, optim_a = a
    tensors_b, optim_b = b
    assert sorted(tensors_a) == sorted(tensors_b)
    for name in tensors_a:
        np.testing.assert_allclose(tensors_a[name], tensors_b[name], atol=atol, rtol=0, err_msg=name)
    for group in optim_a:
        for name in optim_a[group]:
            np.testing.assert_allclose(optim_a[group][name], optim_b[group][name], atol=atol, rtol=0, err_msg=name)


def test_pcm_lora_resume_is_exact(tmp_path):
    straight = _pcm_trainer(tmp_path / "straight", STEPS)
    straight.train()

    first_half = _pcm_trainer(tmp_path / "resumed", STEPS // 2)
    first_half.train()
    assert ckpt.list_checkpoints(tmp_path / "resumed")[-1].name == f"checkpoint-{STEPS // 2}"
    second_half = _pcm_trainer(tmp_path / "resumed", STEPS, resume="latest")
    result = second_half.train()
    assert result.resumed_from.endswith(f"checkpoint-{STEPS // 2}") and result.step == STEPS

    trained = [t for n, t in straight.method.checkpoint_tensors().items() if "lora_B" in n]
    assert max(np.abs(t.numpy()).max() for t in trained) > 1e-4  # the adapters did move away from B = 0
    _assert_same(_state(straight), _state(second_half))
    assert straight.history[-1]["loss/pcm"] == second_half.history[-1]["loss/pcm"]


def _toy_trainer(output_dir, steps, resume=None):
    paddle.seed(5)
    settings = train_config(output_dir=str(output_dir), max_train_steps=steps, checkpointing_steps=3,
                            resume_from_checkpoint=resume, seed=2, report_to="none", learning_rate=0.02,
                            lr_scheduler="linear", lr_warmup_steps=0)
    return Trainer(TwoGroupToy(), DictStream(toy_arrays(), 3), settings)


def test_two_group_resume_is_exact(tmp_path):
    straight = _toy_trainer(tmp_path / "straight", 6)
    straight.train()
    _toy_trainer(tmp_path / "resumed", 6).train()  # writes checkpoint-3 and checkpoint-6
    for path in ckpt.list_checkpoints(tmp_path / "resumed")[1:]:
        import shutil

        shutil.rmtree(path)  # as if the run had stopped after step 3
    resumed = _toy_trainer(tmp_path / "resumed", 6, resume=str(tmp_path / "resumed" / "checkpoint-3"))
    resumed.train()
    _assert_same(_state(straight), _state(resumed))
