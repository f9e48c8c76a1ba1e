"""Benchmark the three ways of running the FLUX transformer, on one small config and the same inputs, in one run.

1. Transformer alone: dygraph, ``paddle.jit.to_static`` (CINN where Paddle has it) and the Paddle Inference
   predictor (oneDNN fusions on CPU). Prints for each the median process CPU time and wall time per call, the
   speed-ups over dygraph and the largest output difference to dygraph. On a machine shared with other jobs the
   CPU time is the figure to compare; wall time also depends on how many cores each path gets to use.
2. End to end: the tiny test pipeline (``tests/fixtures/pipeline/tiny_flux``: tiny CLIP, T5 and VAE) with this
   small transformer in place of its own, 4 steps against 50 steps, with dygraph and with the predictor.

    OMP_NUM_THREADS=1 python scripts/benchmark_inference.py            # defaults: 256x256, 1 thread
    python scripts/benchmark_inference.py --threads 8 --height 512 --width 512

The transformer is randomly initialised (speed does not depend on the values). Default config: 1 double block,
2 single blocks, 4 heads x 64 (about 4.7 M parameters), 256 image tokens and 64 text tokens.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1, help="CPU threads for every path (default 1)")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--text_tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--num_layers", type=int, default=1)
    p.add_argument("--num_single_layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds over the three paths")
    p.add_argument("--pipeline_folder", default=str(REPO / "tests" / "fixtures" / "pipeline" / "tiny_flux"))
    p.add_argument("--skip_pipeline", action="store_true", help="only the transformer benchmark")
    return p.parse_args()


def time_ms(fn, warmup, repeats):
    """``(median process CPU ms, median wall ms)`` per call after ``warmup`` calls.

    CPU time (all threads of this process) is the robust figure on a shared machine, where wall time also
    counts the time other processes hold the cores; on a GPU only wall time is meaningful.
    """
    import paddle

    gpu = paddle.get_device().startswith("gpu")
    for _ in range(warmup):
        fn()
    cpu, wall = [], []
    for _ in range(repeats):
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        fn()
        if gpu:
            paddle.device.synchronize()
        cpu.append(1000 * (time.process_time() - start_cpu))
        wall.append(1000 * (time.perf_counter() - start_wall))
    return statistics.median(cpu), statistics.median(wall)


def small_transformer(args):
    from ppdiffusers_fast.models.transformer_flux import FluxTransformer2DModel

    head_dim = args.head_dim
    rope = [head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8]
    rope[0] += head_dim - sum(rope)
    model = FluxTransformer2DModel(in_channels=64, num_layers=args.num_layers, num_single_layers=args.num_single_layers,
                                   attention_head_dim=head_dim, num_attention_heads=args.heads, joint_attention_dim=32,
                                   pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=rope)
    model.eval()
    return model


def transformer_benchmark(args, model):
    import numpy as np
    import paddle

    from ppdiffusers_fast.inference.compile import build_predictor, compile_transformer
    from ppdiffusers_fast.pipelines.latents import latent_image_ids, text_ids

    rows, cols = args.height // 16, args.width // 16
    b = args.batch
    inputs = [paddle.randn([b, rows * cols, 64]), paddle.randn([b, args.text_tokens, 32]), paddle.randn([b, 32]),
              paddle.full([b], 0.7), latent_image_ids(2 * rows, 2 * cols), text_ids(args.text_tokens),
              paddle.full([b], 3.5)]
    runners = {"dygraph": model, "to_static": compile_transformer(model, use_cinn=True),
               "predictor": build_predictor(model, threads=args.threads)}
    results = {}
    with paddle.no_grad():
        reference = model(*inputs).sample.numpy()
        outputs = {name: run(*inputs).sample.numpy() for name, run in runners.items()}
        timings = {name: [] for name in runners}
        for _ in range(args.rounds):  # interleaved rounds, so that a burst of machine load hits every path
            for name, run in runners.items():
                timings[name].append(time_ms(lambda: run(*inputs), args.warmup, args.repeats))
    for name in runners:
        cpu = statistics.median(t[0] for t in timings[name])
        wall = statistics.median(t[1] for t in timings[name])
        results[name] = (cpu, wall, float(np.abs(outputs[name] - reference).max()))
    print(f"\nTransformer: {model.num_parameters_total() / 1e6:.2f} M parameters, batch {b}, {rows * cols} image "
          f"tokens + {args.text_tokens} text tokens, {args.threads} thread(s), medians of {args.rounds} x "
          f"{args.repeats} calls")
    base_cpu, base_wall = results["dygraph"][:2]
    for name, (cpu, wall, diff) in results.items():
        print(f"  {name:10s} CPU {cpu:8.2f} ms ({base_cpu / cpu:4.2f}x vs dygraph)   wall {wall:8.2f} ms "
              f"({base_wall / wall:4.2f}x)   max |out - dygraph| {diff:.2e}")
    return results, runners


def pipeline_benchmark(args, model, predictor):
    from ppdiffusers_fast.pipelines.pipeline_flux import FluxPipeline

    pipe = FluxPipeline.from_pretrained(args.pipeline_folder)
    pipe.transformer = model
    pipe.set_progress_bar_config(disable=True)
    print(f"\nEnd to end ({args.pipeline_folder} with the transformer above, {args.height}x{args.width}, "
          f"{args.text_tokens} T5 tokens, includes text encoding and VAE decoding)")
    for name, runner in (("dygraph", None), ("predictor", predictor)):
        pipe.set_transformer_runner(runner)
        times = {}
        for steps in (4, 50):
            def call():
                pipe("a photo of a cat", height=args.height, width=args.width, num_inference_steps=steps, seed=0,
                     max_sequence_length=args.text_tokens, output_type="np")
            times[steps] = time_ms(call, 1, 3)
        print(f"  {name:10s} 4 steps CPU {times[4][0]:8.1f} ms (wall {times[4][1]:8.1f})   50 steps CPU "
              f"{times[50][0]:8.1f} ms (wall {times[50][1]:8.1f})   50-step / 4-step CPU time "
              f"{times[50][0] / times[4][0]:5.2f}x")


def main():
    args = parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("MKL_NUM_THREADS", str(args.threads))
    sys.path.insert(0, str(REPO))
    import paddle

    import ppdiffusers_fast  # noqa: F401  (compatibility patches)

    paddle.seed(0)
    print(f"Paddle {paddle.__version__}, device {paddle.get_device()}, CINN compiled: {paddle.is_compiled_with_cinn()}")
    model = small_transformer(args)
    _, runners = transformer_benchmark(args, model)
    if not args.skip_pipeline:
        pipeline_benchmark(args, model, runners["predictor"])


if __name__ == "__main__":
    main()
