"""Benchmark the three ways of running the FLUX transformer, on small configs and the same inputs, in one run.

1. Transformer alone, per preset: dygraph, ``paddle.jit.to_static`` (CINN where Paddle has it) and the Paddle
   Inference predictor (``inference/compile.py``: oneDNN fc, buffers kept between calls), plus, on CPUs with native bfloat16, the predictor with bfloat16
   matrix products (its own row and summary line, with its output difference; not a float32 speed-up).
   Prints for each the median process CPU time and wall time per call, the speed-ups over dygraph and the
   largest output difference to dygraph. On a machine shared with other jobs the CPU time
   is the figure to compare; wall time also counts the time other processes hold the cores. Every path runs
   with the same number of math threads; the paths take turns in interleaved rounds, each round after its own
   warm-up calls, so that a burst of load hits all of them.
2. ``--ablation`` adds predictor rows with one optimisation undone (and ``pred:plain`` with none).
3. ``--breakdown`` profiles dygraph and predictor calls (operator time shares); the predictor's matrix-product
   time bounds any speed-up that leaves the matrix products as they are (both paths call the same sgemm).
4. End to end (presets whose text dims fit ``tests/fixtures/pipeline/tiny_flux``): the tiny test pipeline with
   the benchmark transformer in place of its own, 4 steps against 50 steps, dygraph and predictor.

Presets (all randomly initialised; speed does not depend on the values):
    issue           1 double + 2 single blocks, 4 heads x 64 (4.85 M parameters), 256 image + 64 text tokens
    issue_moderate  the same model, 64 image + 32 text tokens
    issue_small_images  the same model at the demo's image size: batch 16, 16 image + 8 text tokens
    demo            the shipped demo size: 2 + 2 blocks, 4 heads x 16 (0.47 M), 16 image + 8 text tokens, batch 16

    OMP_NUM_THREADS=1 python scripts/benchmark_inference.py                   # every preset, 1 thread
    python scripts/benchmark_inference.py --preset issue --ablation --breakdown --skip_pipeline
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PRESETS = {
    "issue": dict(num_layers=1, num_single_layers=2, heads=4, head_dim=64, joint_dim=32, pooled_dim=32,
                  guidance=True, grid=(16, 16), text_tokens=64, batch=1),
    "issue_moderate": dict(num_layers=1, num_single_layers=2, heads=4, head_dim=64, joint_dim=32, pooled_dim=32,
                           guidance=True, grid=(8, 8), text_tokens=32, batch=1),
    "issue_small_images": dict(num_layers=1, num_single_layers=2, heads=4, head_dim=64, joint_dim=32, pooled_dim=32,
                               guidance=True, grid=(4, 4), text_tokens=8, batch=16),
    "demo": dict(num_layers=2, num_single_layers=2, heads=4, head_dim=16, joint_dim=64, pooled_dim=64,
                 guidance=False, grid=(4, 4), text_tokens=8, batch=16),
}
# Predictor variants of --ablation: build_predictor keyword arguments.
ABLATION = {
    "pred:no-onednn": dict(onednn=False),
    "pred:no-keep": dict(keep_buffers_limit_mb=0),
    "pred:plain": dict(onednn=False, keep_buffers_limit_mb=0),
}
# The bfloat16 predictor (CPUs with native bfloat16): timed with the others, reported apart from the float32
# speed-ups, with its output error against the float32 dygraph model.
BF16_LABEL = "predictor-bf16"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=[*PRESETS, "all"], default="all")
    p.add_argument("--threads", type=int, default=1, help="CPU math threads for every path (default 1)")
    p.add_argument("--batch", type=int, default=None, help="override the preset's batch size")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before each timed round")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per round")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds over the paths")
    p.add_argument("--ablation", action="store_true", help="also time predictors with one optimisation undone")
    p.add_argument("--breakdown", action="store_true", help="profile dygraph: matmul share and speed-up bound")
    p.add_argument("--no_bf16", action="store_true", help="skip the bfloat16 predictor row")
    p.add_argument("--pipeline_folder", default=str(REPO / "tests" / "fixtures" / "pipeline" / "tiny_flux"))
    p.add_argument("--skip_pipeline", action="store_true", help="only the transformer benchmark")
    return p.parse_args()


def time_ms(fn, warmup, repeats):
    """``(list of process CPU ms, list of wall ms)`` of ``repeats`` calls after ``warmup`` calls.

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
    return cpu, wall


def small_transformer(preset):
    from ppdiffusers_fast.models.transformer_flux import FluxTransformer2DModel

    head_dim = preset["head_dim"]
    rope = [head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8]
    rope = [d - d % 2 for d in rope]
    rope[0] += head_dim - sum(rope)
    model = FluxTransformer2DModel(in_channels=64, num_layers=preset["num_layers"],
                                   num_single_layers=preset["num_single_layers"], attention_head_dim=head_dim,
                                   num_attention_heads=preset["heads"], joint_attention_dim=preset["joint_dim"],
                                   pooled_projection_dim=preset["pooled_dim"], guidance_embeds=preset["guidance"],
                                   axes_dims_rope=rope)
    model.eval()
    return model


def transformer_inputs(preset):
    import paddle

    from ppdiffusers_fast.pipelines.latents import latent_image_ids, text_ids

    (rows, cols), b, t = preset["grid"], preset["batch"], preset["text_tokens"]
    return [paddle.randn([b, rows * cols, 64]), paddle.randn([b, t, preset["joint_dim"]]),
            paddle.randn([b, preset["pooled_dim"]]), paddle.full([b], 0.7), latent_image_ids(2 * rows, 2 * cols),
            text_ids(t), paddle.full([b], 3.5) if preset["guidance"] else None]


def transformer_benchmark(args, name, preset, model):
    import numpy as np
    import paddle

    from ppdiffusers_fast.inference.compile import bfloat16_available, build_predictor, compile_transformer

    inputs = transformer_inputs(preset)
    runners = {"dygraph": model, "to_static": compile_transformer(model, use_cinn=True),
               "predictor": build_predictor(model, threads=args.threads)}
    if args.ablation:
        runners.update({label: build_predictor(model, threads=args.threads, **kwargs)
                        for label, kwargs in ABLATION.items()})
    if not args.no_bf16 and bfloat16_available():
        runners[BF16_LABEL] = build_predictor(model, threads=args.threads, precision="bfloat16")
    with paddle.no_grad():
        reference = model(*inputs).sample.numpy()
        outputs = {label: run(*inputs).sample.numpy() for label, run in runners.items()}
        diffs = {label: float(np.abs(out - reference).max()) for label, out in outputs.items()}
        scale = float(np.abs(reference).max())
        cpu = {label: [] for label in runners}
        wall = {label: [] for label in runners}
        for _ in range(args.rounds):  # interleaved rounds, so that a burst of machine load hits every path
            for label, run in runners.items():
                round_cpu, round_wall = time_ms(lambda: run(*inputs), args.warmup, args.repeats)
                cpu[label] += round_cpu
                wall[label] += round_wall
    (rows, cols), b = preset["grid"], preset["batch"]
    print(f"\n[{name}] transformer {model.num_parameters_total() / 1e6:.2f} M parameters ({preset['num_layers']} double"
          f" + {preset['num_single_layers']} single blocks, inner dim {preset['heads'] * preset['head_dim']}), batch "
          f"{b}, {rows * cols} image + {preset['text_tokens']} text tokens, {args.threads} thread(s); medians of "
          f"{args.rounds} x {args.repeats} calls")
    results = {label: (statistics.median(cpu[label]), statistics.median(wall[label]), diffs[label])
               for label in runners}
    base_cpu, base_wall = results["dygraph"][:2]
    for label, (c, w, diff) in results.items():
        if label == BF16_LABEL:
            continue
        print(f"  {label:15s} CPU {c:8.2f} ms ({base_cpu / c:4.2f}x vs dygraph)   wall {w:8.2f} ms "
              f"({base_wall / w:4.2f}x)   max |out - dygraph| {diff:.2e}")
    if BF16_LABEL in results:
        c, w, diff = results[BF16_LABEL]
        print(f"  {BF16_LABEL:15s} CPU {c:8.2f} ms ({base_cpu / c:4.2f}x vs float32 dygraph)   wall {w:8.2f} ms "
              f"({base_wall / w:4.2f}x)   bfloat16 matrix products: max |out - dygraph| {diff:.2e} = "
              f"{diff / scale:.1e} of max |out| ({scale:.2f})")
    return results, runners, inputs


def operator_shares(fn, calls=10):
    """Profile ``calls`` calls of ``fn`` (paddle.profiler, which also records the predictor's operators).

    Returns:
        ``{operator name: share of all operator time}`` over the outermost operator events of every thread.
        Shares are robust to machine load (every operator is slowed alike); absolute times are not.
    """
    import paddle
    import paddle.profiler as profiler
    from paddle.profiler.profiler_statistic import TracerEventType

    with paddle.no_grad():
        for _ in range(3):
            fn()
        prof = profiler.Profiler(targets=[profiler.ProfilerTarget.CPU], on_trace_ready=lambda _: None)  # no trace files
        prof.start()
        for _ in range(calls):
            fn()
            prof.step()
        prof.stop()
    per_op = {}
    for tree in prof.profiler_result.get_data().values():
        stack = list(tree.children_node)
        while stack:
            node = stack.pop()
            if node.type == TracerEventType.Operator:
                per_op[node.name] = per_op.get(node.name, 0) + (node.end_ns - node.start_ns)
            else:
                stack.extend(node.children_node)
    total = sum(per_op.values())
    return {op: t / total for op, t in sorted(per_op.items(), key=lambda kv: -kv[1])}


def is_matrix_product(op_name: str) -> bool:
    return "matmul" in op_name or op_name.endswith(".fc")


def print_breakdown(results, runners, inputs):
    """Where the time goes, and the speed-up bound it implies: the predictor's matrix products use the same
    sgemm as dygraph, so dygraph time / (predictor matmul time) bounds what removing every other cost can give."""
    base_cpu = results["dygraph"][0]
    for label in ("dygraph", "predictor"):
        run = runners[label]
        shares = operator_shares(lambda: run(*inputs))
        matmul = sum(share for op, share in shares.items() if is_matrix_product(op))
        top = ", ".join(f"{op} {100 * share:.0f}%" for op, share in list(shares.items())[:6])
        print(f"  {label} operator time: matrix products {100 * matmul:.0f}%; top: {top}")
        if label == "predictor":
            matmul_ms = matmul * results["predictor"][0]
            attention_ms = shares.get("pd_op.self_dp_attention", 0.0) * results["predictor"][0]
            print(f"  -> the predictor's matrix products take about {matmul_ms:.1f} ms (+ {attention_ms:.1f} ms fused "
                  f"attention, mostly its two products) of its {results['predictor'][0]:.1f} ms CPU time: with every "
                  f"other operator free it would be at most {base_cpu / (matmul_ms + attention_ms):.2f}x faster "
                  f"than dygraph in float32")


def pipeline_benchmark(args, model, predictor, preset):
    from ppdiffusers_fast.pipelines.pipeline_flux import FluxPipeline

    pipe = FluxPipeline.from_pretrained(args.pipeline_folder)
    pipe.transformer = model
    pipe.set_progress_bar_config(disable=True)
    (rows, cols), t = preset["grid"], preset["text_tokens"]
    height, width = 16 * rows, 16 * cols
    print(f"\nEnd to end ({args.pipeline_folder} with the transformer above, {height}x{width}, {t} T5 tokens, "
          f"includes text encoding and VAE decoding)")
    for label, runner in (("dygraph", None), ("predictor", predictor)):
        pipe.set_transformer_runner(runner)
        times = {}
        for steps in (4, 50):
            def call():
                pipe("a photo of a cat", height=height, width=width, num_inference_steps=steps, seed=0,
                     max_sequence_length=t, output_type="np")
            cpu, wall = time_ms(call, 1, 3)
            times[steps] = (statistics.median(cpu), statistics.median(wall))
        print(f"  {label:10s} 4 steps CPU {times[4][0]:8.1f} ms (wall {times[4][1]:8.1f})   50 steps CPU "
              f"{times[50][0]:8.1f} ms (wall {times[50][1]:8.1f})   50-step / 4-step CPU time "
              f"{times[50][0] / times[4][0]:5.2f}x")


def main():
    args = parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("MKL_NUM_THREADS", str(args.threads))
    sys.path.insert(0, str(REPO))
    import paddle

    import ppdiffusers_fast  # noqa: F401  (compatibility patches)

    paddle.base.core.set_num_threads(args.threads)  # dygraph's math library, as the predictor's
    print(f"Paddle {paddle.__version__}, device {paddle.get_device()}, CINN compiled: {paddle.is_compiled_with_cinn()}")
    names = list(PRESETS) if args.preset == "all" else [args.preset]
    summary = []
    for name in names:
        preset = dict(PRESETS[name])
        if args.batch:
            preset["batch"] = args.batch
        paddle.seed(0)
        model = small_transformer(preset)
        results, runners, inputs = transformer_benchmark(args, name, preset, model)
        summary.append((name, results))
        if args.breakdown:
            print_breakdown(results, runners, inputs)
        fits_pipeline = preset["joint_dim"] == 32 and preset["pooled_dim"] == 32 and preset["guidance"]
        if not args.skip_pipeline and fits_pipeline:
            pipeline_benchmark(args, model, runners["predictor"], preset)
    print("\nSummary (CPU time, dygraph / path):")
    for name, results in summary:
        base = results["dygraph"][0]
        print(f"  {name:15s} " + "   ".join(f"{label} {base / cpu:4.2f}x" for label, (cpu, _, _) in results.items()
                                             if label not in ("dygraph", BF16_LABEL)))
        if BF16_LABEL in results:
            print(f"  {'':15s} (bfloat16, not comparable in precision: {BF16_LABEL} {base / results[BF16_LABEL][0]:4.2f}x)")


if __name__ == "__main__":
    main()
