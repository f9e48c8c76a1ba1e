"""Command line of ``examples/flux_lightning/text_to_image_generation_flux_lightning.py``: FLUX + a few-step LoRA.

Loads a local FLUX.1-dev-layout folder, applies the LoRA (its metadata gives the steps' noise levels, guidance
and LoRA scale), optionally compiles the transformer (``--use_cinn``: to_static / CINN; ``--inference_optimize``:
Paddle Inference predictor), writes one PNG per image and, with ``--benchmark``, prints milliseconds per image
and per transformer call after warm-up runs.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

import paddle

from ..command_line import CommandLineParser, UsageError, check_output_dir, run_command
from ..pipelines.model_files import add_model_file_args, load_pipeline, single_files

DEFAULT_STEPS = 4  # without a LoRA that records its K
FLUX_DEFAULTS = {"height": 1024, "width": 1024, "max_sequence_length": 512, "true_cfg_scale": 1.0}
DEFAULT_PROMPT = "a photo of an astronaut riding a horse on the moon, highly detailed"


class NonEmptyPaths(argparse.Action):
    """``nargs="+"`` paths with empty strings dropped: ``--path_to_lora ""`` gives ``[]`` (explicitly no LoRA)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [value for value in values if value])


def build_parser() -> argparse.ArgumentParser:
    p = CommandLineParser(description="Text-to-image with FLUX and a few-step (FLUX-Lightning) LoRA.")
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="local FLUX.1-dev-layout folder (model_index.json, transformer/, vae/, text encoders, ...)")
    add_model_file_args(p)
    p.add_argument("--path_to_lora", nargs="+", action=NonEmptyPaths, default=None, metavar="LORA",
                   help="LoRA safetensors files (ours, diffusers/PEFT, kohya or ComfyUI), all live together: e.g. the "
                        "few-step student and style LoRAs; sampling settings come from the one that carries them")
    p.add_argument("--lora_scale", type=float, nargs="+", default=None, metavar="SCALE",
                   help="LoRA multipliers: one for all files or one per file, in file order (default: each file's "
                        "metadata, else 1)")
    p.add_argument("--prompt", default=None, help=f"text prompt, used as given (\"\" is the empty prompt; "
                                                  f"default: {DEFAULT_PROMPT!r})")
    p.add_argument("--prompt_file", default=None, help="text file with one prompt per line (blank lines skipped)")
    p.add_argument("--negative_prompt", default=None, help="negative prompt (used when --true_cfg_scale > 1)")
    p.add_argument("--true_cfg_scale", type=float, default=None,
                   help="classifier-free guidance scale (default 1 = off)")
    p.add_argument("--height", type=int, default=None, help="image height, a multiple of 16 (default 1024)")
    p.add_argument("--width", type=int, default=None, help="image width, a multiple of 16 (default 1024)")
    p.add_argument("--step", type=int, default=None,
                   help="sampling steps (default: the K the LoRA was trained for, from its metadata, else 4)")
    p.add_argument("--guidance_scale", type=float, default=None,
                   help="embedded guidance (default: the LoRA's, else 3.5)")
    p.add_argument("--seed", type=int, default=42, help="seed of the first image; image i uses seed + i")
    p.add_argument("--num_images", type=int, default=1, help="images per prompt")
    p.add_argument("--max_sequence_length", type=int, default=None, help="T5 tokens (default 512, FLUX.1-dev)")
    p.add_argument("--output_dir", default="outputs/flux_lightning", help="where the PNG files go")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="weights and compute dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--use_cinn", action="store_true",
                   help="compile the transformer with paddle.jit.to_static + CINN (CINN only where Paddle has it)")
    p.add_argument("--inference_optimize", action="store_true",
                   help="run the transformer with a Paddle Inference predictor (oneDNN on CPU)")
    p.add_argument("--predictor_precision", choices=["float32", "bfloat16"], default="float32",
                   help="with --inference_optimize on CPU: bfloat16 matrix products (CPUs with AMX / AVX512-BF16; "
                        "float32 weights and other ops, outputs within bfloat16 rounding of float32)")
    p.add_argument("--predictor_dir", default=None,
                   help="where the exported predictor is kept; reused while the transformer weights, LoRA, scale, "
                        "dtype and Paddle version are unchanged (default: a folder named by them under "
                        "$PPDIFFUSERS_FAST_CACHE, else ~/.cache/ppdiffusers_fast/predictors)")
    p.add_argument("--benchmark", action="store_true", help="warm-up runs, then timed runs (ms per image / call)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up runs with --benchmark")
    p.add_argument("--repeats", type=int, default=3, help="timed runs with --benchmark")
    return p


class TimedRunner:
    """Wraps the transformer call to count calls and their wall time (synchronising the GPU when present)."""

    def __init__(self, run):
        self.run = run
        self.config = run.config
        self.calls = 0
        self.seconds = 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.run(*args, **kwargs)
        _synchronize()
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out

    def reset(self):
        self.calls, self.seconds = 0, 0.0


def _synchronize():
    if paddle.get_device().startswith("gpu"):
        paddle.device.synchronize()


def check_model_given(args) -> None:
    """The model folder is given, has the FLUX.1-dev layout and its JSON configs parse (:class:`UsageError`)."""
    from ..models.flux_folder import SUBFOLDERS, FluxFolderError, check_flux_folder

    if args.pretrained_model_name_or_path is None:
        raise UsageError("no model given: pass --pretrained_model_name_or_path /path/to/FLUX.1-dev (a folder with "
                         "model_index.json, transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/, "
                         "tokenizer_2/, scheduler/) and --path_to_lora /path/to/flux_lightning_lora.safetensors; or "
                         "the single files --transformer_file, --vae_file, --clip_l_file, --t5_file with that folder "
                         "holding tokenizer/ and tokenizer_2/")
    try:
        files = single_files(args)
        folder = (check_flux_folder(args.pretrained_model_name_or_path, require=("tokenizer", "tokenizer_2"),
                                    need_index=False) if files else check_flux_folder(args.pretrained_model_name_or_path))
    except ValueError as error:
        raise UsageError(str(error)) from None
    except FluxFolderError as error:
        raise UsageError(f"--pretrained_model_name_or_path: {error}") from None
    configs = [folder / "model_index.json"] + [folder / sub / config for sub, (config, _, _) in SUBFOLDERS.items()
                                               if config and config.endswith(".json")]
    for file in configs:
        if files and not file.is_file():  # with single files the folder only needs the tokenizers
            continue
        try:
            if not isinstance(json.loads(file.read_text(encoding="utf-8")), dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as error:
            raise UsageError(f"--pretrained_model_name_or_path: {file} is not a valid JSON config ({error})") from None


def apply_flux_defaults(args) -> None:
    """Fill sampling flags still unset with FLUX.1-dev's values (1024 x 1024, 512 T5 tokens, CFG off)."""
    for name, value in FLUX_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def read_prompts(args) -> List[str]:
    """The prompts of ``--prompt_file`` (then ``--prompt``), or ``--prompt`` as given ("" is a prompt too)."""
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise UsageError(f"--prompt_file {path} does not exist")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as error:
            raise UsageError(f"--prompt_file {path} is not UTF-8 text ({error})") from None
        prompts = [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise UsageError(f"--prompt_file {path} holds no prompt")
        return prompts + ([args.prompt] if args.prompt is not None else [])
    return [DEFAULT_PROMPT if args.prompt is None else args.prompt]


def build_pipeline(args):
    from .compile import bfloat16_available, build_predictor, compile_transformer

    dtype = args.dtype or ("bfloat16" if paddle.get_device().startswith("gpu") else "float32")
    if args.predictor_precision == "bfloat16":
        if not args.inference_optimize:
            raise UsageError("--predictor_precision bfloat16 needs --inference_optimize")
        if not bfloat16_available() or dtype != "float32":
            raise UsageError("--predictor_precision bfloat16 needs a CPU with native bfloat16 (AMX / AVX512-BF16), "
                             "a Paddle build with oneDNN and float32 weights (--dtype float32)")
    pipe = load_pipeline(args, dtype)
    if args.path_to_lora:
        pipe.load_loras(args.path_to_lora, args.lora_scale)
        for lora in pipe.loras.values():
            print(f"LoRA {lora.path} ({lora.style}): adapter '{lora.name}', scale {lora.scale:g}, "
                  f"sampling metadata {lora.sampling or 'none'}")
    runner = None
    if args.path_to_lora:
        pipe.fuse_lora()  # adapters and scales are fixed for the run: fold them into the weights (no extra pass)
    if args.inference_optimize:
        predictor_dir, key = predictor_location(args, pipe)
        runner = build_predictor(pipe.transformer, predictor_dir, use_cinn=args.use_cinn,
                                 precision=args.predictor_precision, cache_key=key)
        print(f"predictor {'reused from' if runner.reused else 'exported to'} {predictor_dir}")
    elif args.use_cinn:
        runner = compile_transformer(pipe.transformer, use_cinn=True)
    pipe.set_transformer_runner(runner)
    return pipe


def cache_root() -> Path:
    return Path(os.environ.get("PPDIFFUSERS_FAST_CACHE") or Path.home() / ".cache" / "ppdiffusers_fast")


def predictor_location(args, pipe):
    """``(folder, key)`` of the exported predictor: ``--predictor_dir`` or a cache folder named by the key, which
    covers the transformer folder's files (names, sizes, modification times, safetensors headers), the LoRA
    files' SHA-256 and scales, the model's config and dtype and the Paddle version (``predictor_cache_key``)."""
    from ..evaluation.hashing import folder_fingerprint, sha256_file
    from .compile import predictor_cache_key

    folder = Path(args.pretrained_model_name_or_path) / "transformer"
    sources = [f"transformer {folder_fingerprint(folder)['sha256']}"]
    sources += [f"{path.name} {path.stat().st_size} {path.stat().st_mtime_ns}" for path in sorted(folder.iterdir())]
    sources += [f"lora {sha256_file(lora.path)} scale {lora.scale!r}" for lora in pipe.loras.values()]
    key = predictor_cache_key(pipe.transformer, sources, use_cinn=args.use_cinn)
    return Path(args.predictor_dir or cache_root() / "predictors" / key[:32]), key


def generate(pipe, args, prompts: List[str]):
    return pipe(prompts, negative_prompt=args.negative_prompt, true_cfg_scale=args.true_cfg_scale,
                height=args.height, width=args.width, num_inference_steps=args.step,
                guidance_scale=args.guidance_scale, num_images_per_prompt=args.num_images, seed=args.seed,
                max_sequence_length=args.max_sequence_length, output_type="pil")


def run_benchmark(pipe, args, prompts: List[str]) -> dict:
    """Warm-up runs, then timed runs; prints and returns ms per image and per transformer call."""
    timer = TimedRunner(pipe.transformer_runner)
    pipe.set_transformer_runner(timer)
    pipe.set_progress_bar_config(disable=True)
    for _ in range(max(args.warmup, 0)):
        generate(pipe, args, prompts)
    timer.reset()
    start = time.perf_counter()
    for _ in range(max(args.repeats, 1)):
        output = generate(pipe, args, prompts)
    _synchronize()
    elapsed = time.perf_counter() - start
    images = max(args.repeats, 1) * len(output.images)
    stats = {"ms_per_image": 1000 * elapsed / images, "ms_per_transformer_call": 1000 * timer.seconds / timer.calls,
             "transformer_calls": timer.calls, "images": images}
    mode = "predictor" if args.inference_optimize else "to_static" if args.use_cinn else "dygraph"
    print(f"benchmark ({mode}, {args.height}x{args.width}, {args.step} steps, {images} images after "
          f"{args.warmup} warm-up runs): {stats['ms_per_image']:.1f} ms per image, "
          f"{stats['ms_per_transformer_call']:.1f} ms per transformer call ({timer.calls} calls)")
    pipe.set_transformer_runner(timer.run)
    return {"output": output, **stats}


def check_loras(args) -> dict:
    """Before any model loads: every LoRA file exists and holds finite values, the scales pair up, at most one
    set of sampling settings. Returns those settings (``{}`` without them)."""
    from ..models.lora_io import check_lora_values, combine_sampling, sampling_settings
    from ..pipelines.pipeline_flux import pair_lora_scales

    if args.lora_scale and not args.path_to_lora:
        raise UsageError("--lora_scale needs --path_to_lora")
    if not args.path_to_lora:
        return {}
    try:
        pair_lora_scales(args.path_to_lora, args.lora_scale)
        sampling, _ = combine_sampling([sampling_settings(path) for path in args.path_to_lora])
        for path in args.path_to_lora:
            check_lora_values(path)
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(str(error)) from None
    return sampling


def resolve_step(args, sampling: dict) -> None:
    """``--step`` defaults to the K the LoRA was trained for; an explicit other value is used with a warning."""
    trained = sampling.get("num_inference_steps")
    if args.step is None:
        args.step = int(trained) if trained else DEFAULT_STEPS
    elif trained and args.step != int(trained):
        print(f"warning: the LoRA was trained for {int(trained)} steps (its phase edges); sampling {args.step} "
              f"steps uses generic levels instead", file=sys.stderr)


def check_arguments(args) -> None:
    """Every flag and input file, before any model is loaded (:class:`UsageError` naming the flag)."""
    apply_flux_defaults(args)
    for name in ("height", "width"):
        if getattr(args, name) <= 0 or getattr(args, name) % 16:
            raise UsageError(f"--{name} {getattr(args, name)} is not a positive multiple of 16 "
                             "(FLUX packs 2x2 latent pixels of an 8x downsampling VAE)")
    for name, low in (("step", 1), ("num_images", 1), ("seed", 0), ("max_sequence_length", 1), ("warmup", 0),
                      ("repeats", 1)):
        if getattr(args, name) is not None and getattr(args, name) < low:
            raise UsageError(f"--{name} must be >= {low}, got {getattr(args, name)}")
    if args.true_cfg_scale < 1.0:
        raise UsageError(f"--true_cfg_scale must be >= 1 (1 = off), got {args.true_cfg_scale}")
    check_model_given(args)
    resolve_step(args, check_loras(args))
    if args.prompt_file:
        read_prompts(args)
    check_output_dir(args.output_dir)


def main(argv: Optional[List[str]] = None, fill_defaults: Optional[Callable] = None) -> List[Path]:
    """Parse ``argv``, let ``fill_defaults(args)`` fill unset flags (e.g. an example's bundled model), generate.

    Returns the written PNG paths.
    """
    args = build_parser().parse_args(argv)
    if fill_defaults is not None:
        fill_defaults(args)
    check_arguments(args)
    prompts = read_prompts(args)
    pipe = build_pipeline(args)
    if args.benchmark:
        output = run_benchmark(pipe, args, prompts)["output"]
    else:
        output = generate(pipe, args, prompts)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (image, seed) in enumerate(zip(output.images, output.seeds)):
        path = out_dir / f"{index:03d}_seed{seed}.png"
        image.save(path)
        paths.append(path)
        print(f"wrote {path}")
    return paths


if __name__ == "__main__":
    run_command(main)
