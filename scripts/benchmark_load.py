"""Time loading a FLUX-width transformer: ``load_flux_transformer`` against diffusers' ``from_pretrained``.

Writes a random model in the diffusers layout (bf16 shards + index json, as FLUX.1-dev ships), then loads it in
interleaved rounds, each load in a fresh process (ours in this Python, diffusers in the PyTorch reference
environment), into bfloat16 and into float32, one thread each. Prints per-run seconds of the load call, seconds
until every weight has been read once (load, then a copy of each parameter: diffusers maps same-dtype tensors
and reads them only on first use, so its load call alone hides the reading), peak resident memory
(``VmHWM`` of the loading process after the load call, imports included) and the resident memory once every
weight was read (``VmRSS``: diffusers' mapped weights count from then on), the medians and the ratios.
With ``--check_exact`` it also checks that every loaded parameter equals, bit for bit, a plain numpy load of the
same file (bf16 widened exactly, transposed, cast by Paddle), i.e. the values the loader produced before.

    python scripts/benchmark_load.py                        # the 1.31 B model (2 double + 4 single blocks, 2.6 GB)
    python scripts/benchmark_load.py --num_layers 1 --num_single_layers 1 --rounds 2   # quick, ~0.5 B
    python scripts/benchmark_load.py --single_op            # where the float32 load's time goes, one weight

``--single_op`` times, in this process (one thread), the conversions of one FLUX-size Linear weight
(``[12288, 3072]`` bf16, PyTorch's ``[out, in]``) into a float32 Paddle parameter ``[in, out]``: the cast alone
(all diffusers does), the loader's transposed cast (``models.weights._convert``), and the other orders Paddle and
numpy offer, with the minimum of 5 runs each.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OURS = """
import json, sys, time
from ppdiffusers_fast.models.weights import load_flux_transformer
start = time.perf_counter()
model = load_flux_transformer(sys.argv[1], dtype=sys.argv[2])
seconds = time.perf_counter() - start
peak_kb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
copies = [p.clone() for p in model.parameters()]  # read every weight once
ready = time.perf_counter() - start
del copies
rss_kb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:"))
print(json.dumps({"seconds": seconds, "ready": ready, "peak_mb": peak_kb / 1024, "rss_mb": rss_kb / 1024}))
"""
DIFFUSERS = """
import json, sys, time
import torch
torch.set_num_threads(1)
from diffusers import FluxTransformer2DModel
start = time.perf_counter()
model = FluxTransformer2DModel.from_pretrained(sys.argv[1], torch_dtype=getattr(torch, sys.argv[2]))
seconds = time.perf_counter() - start
peak_kb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
copies = [p.clone() for p in model.parameters()]  # read every weight once (mapped files: now)
ready = time.perf_counter() - start
del copies
rss_kb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:"))
print(json.dumps({"seconds": seconds, "ready": ready, "peak_mb": peak_kb / 1024, "rss_mb": rss_kb / 1024}))
"""


def write_random_model(folder: Path, config: dict, shards: int, seed: int = 0) -> int:
    """Write a diffusers-layout bf16 transformer folder; returns the parameter count."""
    import paddle

    from ppdiffusers_fast.models import safetensors_io
    from ppdiffusers_fast.models.transformer_flux import FluxTransformer2DModel
    from ppdiffusers_fast.models.weights import INDEX_NAME, linear_weight_names

    with paddle.LazyGuard():
        model = FluxTransformer2DModel.from_config(config)
    transposed = linear_weight_names(model)
    shapes = {name: [int(d) for d in p.shape] for name, p in model.state_dict().items()}
    shapes = {name: shape[::-1] if name in transposed else shape for name, shape in shapes.items()}
    total = sum(int(np.prod(s)) for s in shapes.values())
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names, weight_map, shard_index, filled = sorted(shapes), {}, 0, 0
    pending = {}

    def flush(index):
        file = f"diffusion_pytorch_model-{index + 1:05d}-of-{shards:05d}.safetensors"
        safetensors_io.save_file(pending, folder / file)
        weight_map.update({name: file for name in pending})
        pending.clear()

    for name in names:
        values = rng.standard_normal(int(np.prod(shapes[name])), dtype=np.float32) * 0.02
        pending[name] = (safetensors_io.float32_to_bf16_bits(values).reshape(shapes[name]), "BF16")
        filled += values.size
        if filled >= total * (shard_index + 1) / shards and shard_index < shards - 1:
            flush(shard_index)
            shard_index += 1
    flush(shard_index)
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total * 2}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel", **config}, indent=2))
    return total


def run(python: str, code: str, folder: Path, dtype: str, package_root: Path = REPO) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(package_root))
    out = subprocess.run([python, "-c", code, str(folder), dtype], capture_output=True, text=True, env=env,
                         cwd=str(folder.parent))  # not the repository: "python -c" imports from the cwd first
    if out.returncode != 0:
        raise RuntimeError(f"{python} failed (exit code {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_exact(folder: Path, dtype: str) -> None:
    """Every parameter equals a plain numpy load (exact bf16 widening, numpy transpose, Paddle cast)."""
    import paddle

    from ppdiffusers_fast.models import safetensors_io
    from ppdiffusers_fast.models.weights import linear_weight_names, load_flux_transformer, resolve_weight_files

    model = load_flux_transformer(folder, dtype=dtype)
    transposed = linear_weight_names(model)
    params = model.state_dict()
    for file in resolve_weight_files(folder):
        for name, array in safetensors_io.load_file(file).items():
            expected = paddle.to_tensor(np.ascontiguousarray(array.T if name in transposed else array)).astype(dtype)
            got = params[name]
            if not np.array_equal(got.astype("float32").numpy(), expected.astype("float32").numpy()):
                raise AssertionError(f"{name} differs from the plain numpy load ({dtype})")
    print(f"check_exact {dtype}: all {len(params)} tensors bit-exact")


def single_op_table(runs: int = 5) -> None:
    """Print the milliseconds of each way to turn one bf16 ``[out, in]`` weight into a float32 ``[in, out]`` one."""
    import time

    import paddle

    from ppdiffusers_fast.models.weights import _convert

    paddle.set_device("cpu")
    paddle.seed(0)
    stored = paddle.randn([12288, 3072]).astype("bfloat16")

    def dense_transpose_after_cast():
        paddle.set_flags({"FLAGS_use_stride_kernel": False})
        try:
            return paddle.transpose(stored.astype("float32"), [1, 0])
        finally:
            paddle.set_flags({"FLAGS_use_stride_kernel": True})

    def numpy_blocked_after_cast(block=512):
        widened = stored.astype("float32").numpy()
        out = np.empty(widened.shape[::-1], np.float32)
        for i in range(0, widened.shape[0], block):
            for j in range(0, widened.shape[1], block):
                out[j:j + block, i:i + block] = widened[i:i + block, j:j + block].T
        return paddle.to_tensor(out)

    ways = [("cast only, no transpose (diffusers' work)", lambda: stored.astype("float32")),
            ("the loader: transposed view cast in one pass", lambda: _convert(stored, True, paddle.float32, True)),
            ("cast, then transpose + contiguous copy",
             lambda: paddle.transpose(stored.astype("float32"), [1, 0]).contiguous()),
            ("cast, then Paddle's dense transpose kernel", dense_transpose_after_cast),
            ("cast, then numpy blocked transpose (512 x 512)", numpy_blocked_after_cast)]
    expected = ways[1][1]()
    print("| conversion of one [12288, 3072] bf16 weight to float32 | ms (min of %d) |" % runs)
    print("|---|---:|")
    for name, way in ways:
        seconds = []
        for _ in range(runs):
            start = time.perf_counter()
            result = way()
            seconds.append(time.perf_counter() - start)
        if name != ways[0][0] and not bool(paddle.equal_all(result, expected)):
            raise AssertionError(f"{name}: values differ from the loader's")
        print(f"| {name} | {min(seconds) * 1000:.0f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default="/tmp/flux_load_benchmark/transformer")
    parser.add_argument("--num_layers", type=int, default=2, help="double blocks")
    parser.add_argument("--num_single_layers", type=int, default=4)
    parser.add_argument("--num_attention_heads", type=int, default=24, help="of 128 channels each (FLUX: 24)")
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--reference_python", default="/work/venv-ref/bin/python")
    parser.add_argument("--check_exact", action="store_true")
    parser.add_argument("--baseline_ref", default=None,
                        help="also time this git revision's loader (e.g. a commit before the change)")
    parser.add_argument("--keep", action="store_true", help="keep the written model (deleted by default)")
    parser.add_argument("--single_op", action="store_true",
                        help="only time the conversions of one FLUX-size weight (no model written)")
    args = parser.parse_args()
    if args.single_op:
        single_op_table()
        return

    folder = Path(args.folder)
    config = {"patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": args.num_layers,
              "num_single_layers": args.num_single_layers, "attention_head_dim": 128,
              "num_attention_heads": args.num_attention_heads, "joint_attention_dim": 4096,
              "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": [16, 56, 56]}
    try:
        count = write_random_model(folder, config, args.shards)
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        print(f"model: {count / 1e9:.2f} B parameters, {size / 1e9:.2f} GB bf16 in {args.shards} shards at {folder}")
        if args.check_exact:
            for dtype in args.dtypes:
                check_exact(folder, dtype)
        for file in folder.glob("*.safetensors"):  # both sides read from the page cache
            file.read_bytes()
        sides = [("ours", sys.executable, OURS, REPO), ("diffusers", args.reference_python, DIFFUSERS, REPO)]
        if args.baseline_ref:
            baseline = folder.parent / "baseline_package"
            baseline.mkdir(exist_ok=True)
            archive = subprocess.run(["git", "-C", str(REPO), "archive", args.baseline_ref, "ppdiffusers_fast"],
                                     check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive, check=True)
            sides.append(("before", sys.executable, OURS, baseline))
        results = {(side[0], dtype): [] for side in sides for dtype in args.dtypes}
        for round_index in range(args.rounds):
            for dtype in args.dtypes:
                for side, python, code, root in sides if round_index % 2 == 0 else sides[::-1]:
                    result = run(python, code, folder, dtype, root)
                    results[(side, dtype)].append(result)
                    print(f"round {round_index} {dtype:9s} {side:9s} load {result['seconds']:7.2f} s, weights read "
                          f"{result['ready']:7.2f} s, peak {result['peak_mb'] / 1024:6.2f} GB, resident after reading "
                          f"{result['rss_mb'] / 1024:6.2f} GB", flush=True)
        median = lambda side, dtype, key: statistics.median(r[key] for r in results[(side, dtype)])  # noqa: E731
        print("\nmedians (one thread each, interleaved, fresh process per load); ratios are ours / diffusers")
        print("| target | side | load s | load + read every weight s | peak GB | resident GB | load ratio | "
              "read ratio | peak ratio | resident ratio |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        keys = ("seconds", "ready", "peak_mb", "rss_mb")
        for dtype in args.dtypes:
            for side, *_ in sides:
                values = [median(side, dtype, key) for key in keys]
                ref = [median("diffusers", dtype, key) for key in keys]
                print(f"| {dtype} | {side} | {values[0]:.2f} | {values[1]:.2f} | {values[2] / 1024:.2f} | "
                      f"{values[3] / 1024:.2f} | " + " | ".join(f"{v / r:.2f}x" for v, r in zip(values, ref)) + " |")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
