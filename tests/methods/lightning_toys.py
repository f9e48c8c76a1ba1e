"""Tiny FLUX bases, batches and method builders shared by the method tests (not a test module)."""
import numpy as np
import paddle

from ppdiffusers_fast.methods.adversarial import AdversarialConfig
from ppdiffusers_fast.methods.denoiser import FluxCondition, FluxDenoiser
from ppdiffusers_fast.methods.distribution_matching import DistributionMatchingConfig
from ppdiffusers_fast.methods.dmd2 import DMD2, DMD2Config
from ppdiffusers_fast.methods.flux_lightning import FluxLightning
from ppdiffusers_fast.methods.base import FewStepSchedule, LatentBatch
from ppdiffusers_fast.methods.pcm import PCM, PCMConfig
from ppdiffusers_fast.methods.reflow import ReflowConfig
from ppdiffusers_fast.models.lora import adapter_parameters, inject_trainable_lora, lora_layers
from ppdiffusers_fast.pipelines.latents import latent_image_ids, pack_latents
from tiny_models import tiny_flux, tiny_lora

TINY_LORA = tiny_lora()
HEAD_CHANNELS = 8


def tiny_denoiser(seed=0, guidance_embeds=True):
    return FluxDenoiser(tiny_flux(seed, guidance_embeds))


def student_denoiser(seed=0):
    """A tiny denoiser with a trainable "student" adapter (still zero: see :func:`randomize_adapters`)."""
    denoiser = tiny_denoiser(seed)
    inject_trainable_lora(denoiser.transformer, TINY_LORA, "student")
    return denoiser


def tiny_batch(batch_size=2, latent_hw=(4, 8), text_len=5, seed=1):
    """A ``LatentBatch`` of random latents ``[B, 4, H, W]`` (non-square by default: a 2 x 4 token grid)."""
    rng = np.random.RandomState(seed)
    latents = paddle.to_tensor(rng.randn(batch_size, 4, *latent_hw).astype("float32"))
    prompt = paddle.to_tensor(rng.randn(batch_size, text_len, 32).astype("float32"))
    pooled = paddle.to_tensor(rng.randn(batch_size, 32).astype("float32"))
    cond = FluxCondition(prompt, pooled, paddle.zeros([text_len, 3]), latent_image_ids(*latent_hw))
    return LatentBatch(pack_latents(latents), cond, tuple(latent_hw))


def randomize_adapters(denoiser, names, scale=0.2, seed=5):
    """Give adapters non-zero B matrices so that student, fake score and base differ."""
    rng = np.random.RandomState(seed)
    for name in names:
        for param in adapter_parameters(denoiser.transformer, name):
            param.set_value(paddle.to_tensor((rng.randn(*param.shape) * scale).astype("float32")))


def tiny_schedule(**kw):
    """The few-step schedule of the method tests: N = 8 grid steps, K = 2 phases."""
    kw.setdefault("num_euler_timesteps", 8)
    kw.setdefault("multiphase", 2)
    return FewStepSchedule(**kw)


def tiny_flux_lightning(seed=0, adv=True, dmd=True, reflow=True, fake_score="auto", adv_kw=None, dmd_kw=None,
                        pcm_kw=None, reflow_kw=None, schedule_kw=None):
    denoiser = tiny_denoiser(seed)
    pcm = PCM(denoiser, TINY_LORA, tiny_schedule(**(schedule_kw or {})), PCMConfig(**(pcm_kw or {})))
    # the every-step schedule (--no_adv_alternate) unless adv_kw asks for the reference's alternation
    adversarial = AdversarialConfig(adv_weight=0.1 if adv else 0.0, adv_head_channels=HEAD_CHANNELS,
                                    **{"adv_alternate": False, **(adv_kw or {})})
    dmd_config = DistributionMatchingConfig(use_dmd_loss=dmd, dmd_fake_score=fake_score, **(dmd_kw or {}))
    reflow_config = ReflowConfig(apply_reflow_loss=reflow, **(reflow_kw or {}))
    return FluxLightning(pcm, adversarial, dmd_config, reflow_config, TINY_LORA)


def tiny_dmd2(seed=0, gan_weight=0.1, fake_score_updates=2, **dmd2_kw):
    denoiser = tiny_denoiser(seed)
    return DMD2(denoiser, TINY_LORA, tiny_schedule(),
                DistributionMatchingConfig(dmd_fake_score_updates=fake_score_updates),
                AdversarialConfig(adv_head_channels=HEAD_CHANNELS),
                DMD2Config(dmd2_gan_weight=gan_weight, **dmd2_kw))


def base_parameters(denoiser):
    """Every parameter of the frozen base (no adapter parameter)."""
    adapter_ids = {id(p) for _, layer in lora_layers(denoiser.transformer) for p in layer.lora_adapters.parameters()}
    return [p for p in denoiser.transformer.parameters() if id(p) not in adapter_ids]


def has_gradient(params):
    """True when any parameter holds a non-zero gradient."""
    return any(p.grad is not None and float(np.abs(p.grad.numpy()).sum()) > 0 for p in params)


def clear_gradients(params):
    for p in params:
        p.clear_gradient(set_to_zero=False)


def groups_reached(method, result):
    """The parameter groups that ``result.total().backward()`` gives a non-zero gradient (grads cleared first)."""
    groups = method.parameter_groups()
    clear_gradients([p for params in groups.values() for p in params])
    result.total().backward()
    return {name for name, params in groups.items() if has_gradient(params)}


class RepeatStream:
    """The same batch forever, with the position interface the trainer checkpoints."""

    def __init__(self, batch):
        self.batch, self.position = batch, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.position += 1
        return self.batch

    def state_dict(self):
        return {"position": self.position}

    def set_state_dict(self, state):
        self.position = int(state["position"])


def group_values(method):
    """``{group: [numpy copies of its parameters]}``."""
    return {g: [p.numpy().copy() for p in params] for g, params in method.parameter_groups().items()}


def changed(before, after):
    """``{group: True when any of its parameters changed}``."""
    return {g: any(not np.array_equal(a, b) for a, b in zip(before[g], after[g])) for g in before}


def run_trainer(method, batch, output_dir, steps, learning_rate=1e-3):
    from ppdiffusers_fast.training.config import train_config
    from ppdiffusers_fast.training.trainer import Trainer

    settings = train_config(output_dir=str(output_dir), max_train_steps=steps, report_to="none",
                            checkpointing_steps=1000, learning_rate=learning_rate, adam_weight_decay=0.0,
                            seed=None, resume_from_checkpoint=None)
    return Trainer(method, RepeatStream(batch), settings).train()
