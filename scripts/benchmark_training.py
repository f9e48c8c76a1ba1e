"""Training throughput and peak memory of PCM on a small FLUX, with and without gradient checkpointing.

Each setting runs in its own process (peak RSS is a process-lifetime maximum): build a randomly initialised
FLUX transformer, inject the LoRA student, run a few warm-up updates, then time ``--steps`` updates of the
real trainer. Reports samples per second and peak memory: on CPU the peak resident set size
(``ru_maxrss``) and its rise over the size before the first update (model, adapters and data built:
the memory training itself takes); on GPU ``max_memory_allocated``.

    python scripts/benchmark_training.py                 # both settings, a table
    python scripts/benchmark_training.py --json out.json
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_one(args) -> dict:
    import numpy as np
    import paddle

    from ppdiffusers_fast.methods.denoiser import FluxDenoiser
    from ppdiffusers_fast.methods.base import FewStepSchedule
    from ppdiffusers_fast.methods.pcm import PCM
    from ppdiffusers_fast.models.lora import LoraConfig
    from ppdiffusers_fast.models.transformer_flux import FluxTransformer2DModel
    from ppdiffusers_fast.training.batches import InMemoryLatentDataset, LoaderStream, latent_loader
    from ppdiffusers_fast.training.config import ModelConfig, train_config
    from ppdiffusers_fast.training.trainer import Trainer

    paddle.seed(0)
    heads, head_dim = args.heads, args.head_dim
    rope = (head_dim // 4, 3 * head_dim // 8, head_dim - head_dim // 4 - 3 * head_dim // 8)
    transformer = FluxTransformer2DModel(in_channels=64, num_layers=args.double_blocks,
                                         num_single_layers=args.single_blocks, attention_head_dim=head_dim,
                                         num_attention_heads=heads, joint_attention_dim=args.text_dim,
                                         pooled_projection_dim=args.text_dim, guidance_embeds=True,
                                         axes_dims_rope=rope)
    denoiser = FluxDenoiser(transformer)
    if args.checkpointing:
        denoiser.enable_gradient_checkpointing()
    method = PCM(denoiser, LoraConfig(rank=args.lora_rank, alpha=ModelConfig.lora_alpha),
                 FewStepSchedule(num_euler_timesteps=50, multiphase=4))
    rng = np.random.RandomState(0)
    n = args.batch_size * 4
    side = args.latent_size
    dataset = InMemoryLatentDataset({
        "latents": rng.randn(n, 16, side, side).astype("float32"),
        "prompt_embeds": rng.randn(n, args.text_len, args.text_dim).astype("float32"),
        "pooled_prompt_embeds": rng.randn(n, args.text_dim).astype("float32")})
    stream = LoaderStream(latent_loader(dataset, args.batch_size))
    with tempfile.TemporaryDirectory() as out:
        settings = train_config(output_dir=out, max_train_steps=args.warmup, checkpointing_steps=10**9,
                                report_to="none", seed=0, train_batch_size=args.batch_size,
                                mixed_precision="bf16", learning_rate=1e-4, resume_from_checkpoint=None)
        trainer = Trainer(method, stream, settings)
        rss_before_training = _rss_mb()
        trainer.train()  # warm-up (allocations, kernel choices)
        if paddle.get_device() != "cpu":
            paddle.device.cuda.reset_max_memory_allocated()
        trainer.max_train_steps = args.warmup + args.steps
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    result = {"gradient_checkpointing": bool(args.checkpointing), "device": paddle.get_device(),
              "samples_per_second": args.steps * args.batch_size / seconds,
              "seconds_per_step": seconds / args.steps, "image_tokens": (side // 2) ** 2,
              "batch_size": args.batch_size,
              "parameters": sum(int(np.prod(p.shape)) for p in transformer.parameters())}
    if paddle.get_device() == "cpu":
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result.update(peak_rss_mb=peak, rss_before_training_mb=rss_before_training)
    else:
        result.update(peak_gpu_allocated_mb=paddle.device.cuda.max_memory_allocated() / 2**20)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--double_blocks", type=int, default=2)
    parser.add_argument("--single_blocks", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head_dim", type=int, default=32)
    parser.add_argument("--text_dim", type=int, default=64)
    parser.add_argument("--text_len", type=int, default=32)
    parser.add_argument("--latent_size", type=int, default=32, help="latent side h = w (tokens = (h/2)^2)")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--lora_rank", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--checkpointing", type=int, choices=[0, 1], default=None,
                        help="run one setting in this process (used internally)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.checkpointing is not None:
        print(json.dumps(run_one(args)))
        return
    results = []
    passthrough = [a for a in sys.argv[1:] if not a.startswith("--json")]
    if "--json" in sys.argv:
        index = sys.argv.index("--json")
        passthrough = sys.argv[1:index] + sys.argv[index + 2:]
    for flag in (0, 1):
        proc = subprocess.run([sys.executable, __file__, *passthrough, "--checkpointing", str(flag)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"benchmark run failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"{'checkpointing':>13} {'samples/s':>10} {'s/step':>8} {'peak memory MB':>15} {'training MB':>12}")
    for r in results:
        peak = r.get("peak_rss_mb", r.get("peak_gpu_allocated_mb"))
        rise = r["peak_rss_mb"] - r["rss_before_training_mb"] if "peak_rss_mb" in r else float("nan")
        print(f"{str(r['gradient_checkpointing']):>13} {r['samples_per_second']:10.2f} {r['seconds_per_step']:8.3f} "
              f"{peak:15.1f} {rise:12.1f}")
    print(f"device {results[0]['device']}, {results[0]['parameters']:,} parameters, batch {results[0]['batch_size']}, "
          f"{results[0]['image_tokens']} image tokens")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
