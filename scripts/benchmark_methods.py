"""Step time of PCM alone vs FLUX-Lightning (PCM + adversarial + DMD + reflow) per generator step.

Every variant runs on the same tiny FLUX base (same config, same seed, same batch) and each timed step does
what the trainer does per update minus the optimizer: ``train_step`` and one ``backward`` per returned group.
The figure of merit is the full recipe's median step time over PCM's (target: at most 3x).

    python scripts/benchmark_methods.py                    # default tiny config, CPU
    python scripts/benchmark_methods.py --latent 64 --gradient_checkpointing
"""
import argparse
import statistics
import time

import numpy as np
import paddle

from ppdiffusers_fast.methods.adversarial import AdversarialConfig
from ppdiffusers_fast.methods.denoiser import FluxCondition, FluxDenoiser
from ppdiffusers_fast.methods.distribution_matching import DistributionMatchingConfig
from ppdiffusers_fast.methods.flux_lightning import FluxLightning
from ppdiffusers_fast.methods.base import FewStepSchedule, LatentBatch
from ppdiffusers_fast.methods.pcm import PCM
from ppdiffusers_fast.methods.reflow import ReflowConfig
from ppdiffusers_fast.models.lora import LoraConfig, adapter_parameters
from ppdiffusers_fast.models.transformer_flux import FluxTransformer2DModel
from ppdiffusers_fast.pipelines.latents import latent_image_ids, pack_latents

VARIANTS = {  # name -> (adversarial, dmd, reflow)
    "pcm": (False, False, False),
    "pcm+adversarial": (True, False, False),
    "pcm+dmd": (False, True, False),
    "pcm+reflow": (False, False, True),
    "flux_lightning": (True, True, True),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_layers", type=int, default=2, help="double-stream blocks")
    parser.add_argument("--num_single_layers", type=int, default=4, help="single-stream blocks")
    parser.add_argument("--num_attention_heads", type=int, default=4)
    parser.add_argument("--attention_head_dim", type=int, default=32)
    parser.add_argument("--latent", type=int, default=32, help="latent height = width (tokens = (latent / 2)^2)")
    parser.add_argument("--text_len", type=int, default=32, help="prompt tokens")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--head_channels", type=int, default=32, help="hidden channels of each discriminator head")
    parser.add_argument("--steps", type=int, default=10, help="timed generator steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build_variant(args, adversarial: bool, dmd: bool, reflow: bool):
    paddle.seed(args.seed)
    head_dim = args.attention_head_dim
    axes = (head_dim // 4, 3 * head_dim // 8, head_dim - head_dim // 4 - 3 * head_dim // 8)
    transformer = FluxTransformer2DModel(
        in_channels=16, num_layers=args.num_layers, num_single_layers=args.num_single_layers,
        attention_head_dim=head_dim, num_attention_heads=args.num_attention_heads, joint_attention_dim=64,
        pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=axes)
    denoiser = FluxDenoiser(transformer)
    if args.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    lora = LoraConfig(rank=args.lora_rank, alpha=float(args.lora_rank))
    pcm = PCM(denoiser, lora, FewStepSchedule(num_euler_timesteps=100, multiphase=4))
    method = FluxLightning(pcm, AdversarialConfig(adv_weight=0.1 if adversarial else 0.0,
                                                  adv_head_channels=args.head_channels),
                           DistributionMatchingConfig(use_dmd_loss=dmd), ReflowConfig(apply_reflow_loss=reflow), lora)
    rng = np.random.RandomState(args.seed)
    for param in adapter_parameters(transformer, "student"):  # a student that differs from its teacher
        param.set_value(paddle.to_tensor((rng.randn(*param.shape) * 0.02).astype("float32")))
    method.train()
    return method


def tiny_batch(args):
    rng = np.random.RandomState(args.seed + 1)
    latents = paddle.to_tensor(rng.randn(args.batch_size, 4, args.latent, args.latent).astype("float32"))
    prompt = paddle.to_tensor(rng.randn(args.batch_size, args.text_len, 64).astype("float32"))
    pooled = paddle.to_tensor(rng.randn(args.batch_size, 32).astype("float32"))
    cond = FluxCondition(prompt, pooled, paddle.zeros([args.text_len, 3]), latent_image_ids(args.latent, args.latent))
    return LatentBatch(pack_latents(latents), cond, (args.latent, args.latent))


class GeneratorStepTimer:
    """Times updates that include a generator step (train_step + backward of every returned group)."""

    def __init__(self, method, batch):
        self.method, self.batch, self.step = method, batch, 0
        self.params = [p for group in method.parameter_groups().values() for p in group]

    def __call__(self) -> float:
        while "generator" not in self.method.update_schedule(self.step):
            self.step += 1
        started = time.perf_counter()
        for result in self.method.train_step(self.batch, self.step):
            result.total().backward()
        elapsed = time.perf_counter() - started
        for p in self.params:
            p.clear_gradient(set_to_zero=False)
        self.step += 1
        return elapsed


def main(argv=None):
    args = parse_args(argv)
    batch = tiny_batch(args)
    print(f"tiny FLUX: {args.num_layers} double + {args.num_single_layers} single blocks, inner dim "
          f"{args.num_attention_heads * args.attention_head_dim}, {(args.latent // 2) ** 2} image tokens, batch "
          f"{args.batch_size}, LoRA rank {args.lora_rank}, head channels {args.head_channels}, gradient "
          f"checkpointing {'on' if args.gradient_checkpointing else 'off'}, {paddle.get_device()}")
    timers = {name: GeneratorStepTimer(build_variant(args, *parts), batch) for name, parts in VARIANTS.items()}
    times = {name: [] for name in VARIANTS}
    # round-robin, so that a change of machine load reaches every variant alike
    for round_index in range(args.warmup + args.steps):
        for name, timer in timers.items():
            elapsed = timer()
            if round_index >= args.warmup:
                times[name].append(elapsed)
    seconds = {name: statistics.median(values) for name, values in times.items()}
    for name in VARIANTS:
        print(f"{name:>16}: {seconds[name] * 1000:8.1f} ms per generator step (median of {args.steps}; "
              f"min {min(times[name]) * 1000:.1f} ms), {seconds[name] / seconds['pcm']:.2f}x PCM")
    ratio = seconds["flux_lightning"] / seconds["pcm"]
    print(f"full recipe / PCM = {ratio:.2f}x (target <= 3x): {'OK' if ratio <= 3.0 else 'ABOVE TARGET'}")
    return ratio


if __name__ == "__main__":
    main()
