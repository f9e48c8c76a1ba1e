"""Command line of ``scripts/evaluate_coco10k.py``: flags -> :func:`~.coco_benchmark.run_coco_evaluation`.

Inputs are checked (paths exist, kinds are right) before anything heavy runs. The generators are FLUX
teacher/student over ``--pretrained_model_name_or_path`` (+ ``--path_to_lora``), or any generator given as
``--generate_fn file.py:make`` where ``make(role, num_inference_steps, height, width, guidance_scale)``
returns ``generate_fn(prompts, seeds) -> images`` (``role`` is ``"teacher"`` or ``"student"``).
"""
import json
import os
import sys

from ..command_line import CommandLineParser, UsageError, check_output_dir
from ..pipelines.model_files import add_model_file_args, single_files
from .coco_benchmark import EvaluationConfig, run_coco_evaluation
from .generate import LazyGenerateFn
from .hashing import HashCache, folder_fingerprint, sha256_file


DEFAULT_STUDENT_STEPS = 4  # without a LoRA that records its K


def build_parser():
    parser = CommandLineParser(description="COCO-10k evaluation: FID-FLUX (student vs 50-step teacher), "
                                                 "CLIP score, optional FID vs real images.")
    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", default=None,
                       help="local FLUX.1 folder (diffusers layout); with the single-file flags, the tokenizers' folder")
    add_model_file_args(model)
    model.add_argument("--path_to_lora", nargs="+", default=None, metavar="LORA",
                       help="student LoRA file(s) (safetensors; ours, diffusers/PEFT, kohya or ComfyUI), all live "
                            "together, e.g. the few-step student and a style LoRA")
    model.add_argument("--lora_scale", type=float, nargs="+", default=None, metavar="SCALE",
                       help="LoRA scales: one for all files or one per file (default: each file's metadata, else 1)")
    model.add_argument("--dtype", default="float32", help="pipeline dtype (bfloat16 on GPU)")
    model.add_argument("--generate_fn", default=None,
                       help="instead of FLUX: file.py:make or module:make, make(role, num_inference_steps, height, "
                            "width, guidance_scale) -> generate_fn(prompts, seeds)")
    prompts = parser.add_argument_group("prompts and sampling")
    prompts.add_argument("--captions_file", default=None,
                         help="captions_val2014/2017.json, or a .tsv/.txt of prompts (needed on the first run)")
    prompts.add_argument("--num_prompts", type=int, default=10000)
    prompts.add_argument("--prompt_seed", type=int, default=0, help="seed of the caption selection")
    prompts.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    prompts.add_argument("--height", type=int, default=1024)
    prompts.add_argument("--width", type=int, default=1024)
    prompts.add_argument("--student_steps", type=int, default=None,
                         help="student sampling steps (default: the K the LoRA was trained for, else 4)")
    prompts.add_argument("--teacher_steps", type=int, default=50)
    prompts.add_argument("--guidance_scale", type=float, default=3.5)
    prompts.add_argument("--batch_size", type=int, default=4, help="generation batch size")
    prompts.add_argument("--teacher_dir", default=None, help="shared teacher reference folder (default: in output_dir)")
    metrics = parser.add_argument_group("metrics")
    metrics.add_argument("--feature_extractor", default="inception",
                         help="inception | clip | path/to/file.py:function returning a FeatureExtractor")
    metrics.add_argument("--inception_weights", default=None,
                         help="FID InceptionV3 .safetensors (scripts/convert_inception_weights.py)")
    metrics.add_argument("--clip_model_path", default=None, help="local CLIP folder (Hugging Face layout); "
                                                                 "omit to skip the CLIP score")
    metrics.add_argument("--real_images_dir", default=None,
                         help="folder of real images (or .npz statistics) for FID vs real")
    metrics.add_argument("--feature_batch_size", type=int, default=50)
    metrics.add_argument("--fid_method", choices=["sqrtm", "eigh"], default="sqrtm",
                         help="matrix square root: sqrtm (as pytorch-fid, default) or eigh (same value, faster)")
    metrics.add_argument("--full_model_hash", action="store_true",
                         help="hash every byte of the model folder (default: a fast fingerprint, see hashing.py)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--no_progress", action="store_true", help="hide progress bars")
    return parser


def _require_file(path, flag, suffixes=None):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag}: file not found: {path}")
    if suffixes and not path.endswith(suffixes):
        raise ValueError(f"{flag}: expected a {'/'.join(suffixes)} file, got {path}")


def validate_args(args):
    """Clear errors for bad inputs before any model is loaded."""
    if (args.pretrained_model_name_or_path is None) == (args.generate_fn is None):
        raise ValueError("give exactly one of --pretrained_model_name_or_path and --generate_fn")
    if args.pretrained_model_name_or_path and not os.path.exists(args.pretrained_model_name_or_path):
        raise FileNotFoundError(f"--pretrained_model_name_or_path: not found: {args.pretrained_model_name_or_path}")
    single_files(args)  # all four single files or none, each existing
    if args.lora_scale and not args.path_to_lora:
        raise ValueError("--lora_scale needs --path_to_lora")
    if args.path_to_lora:
        from ..models.lora_io import check_lora_values, combine_sampling, sampling_settings
        from ..pipelines.pipeline_flux import pair_lora_scales

        for path in args.path_to_lora:
            _require_file(path, "--path_to_lora", (".safetensors",))
        pair_lora_scales(args.path_to_lora, args.lora_scale)
        sampling, _ = combine_sampling([sampling_settings(path) for path in args.path_to_lora])
        for path in args.path_to_lora:
            check_lora_values(path)
        trained = sampling.get("num_inference_steps")
        if args.student_steps is None and trained:
            args.student_steps = int(trained)
        elif trained and args.student_steps != int(trained):
            print(f"warning: the LoRA was trained for {int(trained)} steps (its phase edges); sampling "
                  f"{args.student_steps} steps uses generic levels instead", file=sys.stderr)
    if args.student_steps is None:
        args.student_steps = DEFAULT_STUDENT_STEPS
    if args.captions_file:
        _require_file(args.captions_file, "--captions_file", (".json", ".tsv", ".txt"))
    elif not os.path.isfile(os.path.join(args.output_dir, "prompts.json")):
        raise ValueError(f"--captions_file is needed: {args.output_dir}/prompts.json does not exist yet")
    if args.feature_extractor == "inception":
        if not args.inception_weights:
            raise ValueError("--feature_extractor inception needs --inception_weights (convert the published .pth "
                             "or .pdparams once with scripts/convert_inception_weights.py)")
        _require_file(args.inception_weights, "--inception_weights", (".safetensors",))
    if args.feature_extractor == "clip" and not args.clip_model_path:
        raise ValueError("--feature_extractor clip needs --clip_model_path")
    if args.clip_model_path and not os.path.isfile(os.path.join(args.clip_model_path, "config.json")):
        raise FileNotFoundError(f"--clip_model_path: no config.json in {args.clip_model_path}")
    if args.real_images_dir and not os.path.exists(args.real_images_dir):
        raise FileNotFoundError(f"--real_images_dir: not found: {args.real_images_dir}")
    for flag in ("num_prompts", "height", "width", "student_steps", "teacher_steps", "batch_size", "feature_batch_size"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag} must be positive, got {getattr(args, flag)}")
    for flag in ("seed", "prompt_seed"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    for flag in ("height", "width"):
        if getattr(args, flag) % 16:
            raise ValueError(f"--{flag} {getattr(args, flag)} is not a multiple of 16")


def _custom_spec_identity(spec, cache):
    location = spec.rsplit(":", 1)[0]
    identity = {"spec": spec}
    if location.endswith(".py") and os.path.isfile(location):
        identity["file_sha256"] = sha256_file(location, cache)
    return identity


def build_generators(args, cache):
    """``(teacher_fn, student_fn, identities)``; nothing is loaded until an image must be generated."""
    if args.generate_fn:
        from .features import load_object

        def factory(role, steps):
            return lambda: load_object(args.generate_fn)(role, steps, args.height, args.width, args.guidance_scale)

        teacher = LazyGenerateFn(factory("teacher", args.teacher_steps))
        student = LazyGenerateFn(factory("student", args.student_steps))
        model_identity = _custom_spec_identity(args.generate_fn, cache)
    else:
        from .flux_generators import FluxTeacherStudent

        files = single_files(args)
        flux = FluxTeacherStudent(args.pretrained_model_name_or_path, args.height, args.width, args.guidance_scale,
                                  args.teacher_steps, args.student_steps, args.path_to_lora, args.lora_scale, args.dtype,
                                  single_files=files)
        teacher, student = flux.teacher, flux.student
        model_identity = folder_fingerprint(args.pretrained_model_name_or_path,
                                            full_hash_limit=None if args.full_model_hash else 64 * 1024 * 1024,
                                            cache=cache)
        model_identity["path"] = os.path.abspath(args.pretrained_model_name_or_path)
        if files:  # single files: identified by path and size
            model_identity["single_files"] = {kind: [os.path.abspath(path), os.path.getsize(path)]
                                              for kind, path in files.items()}
    loras = args.path_to_lora or []
    identities = {"model": model_identity, "dtype": args.dtype,
                  "lora": [sha256_file(path, cache) for path in loras] or None,
                  "lora_file": [os.path.basename(path) for path in loras] or None,
                  "lora_scale": args.lora_scale}
    return teacher, student, identities


def build_metrics(args, cache):
    """``(extractor_factory, extractor_identity, clip_factory, clip_identity)`` (all lazy)."""
    from .features import build_feature_extractor

    clip_holder = []

    def clip_factory():
        if not clip_holder:
            from .clip_score import ClipEmbedder

            clip_holder.append(ClipEmbedder(args.clip_model_path))
        return clip_holder[0]

    clip_identity = None
    if args.clip_model_path:
        clip_identity = folder_fingerprint(args.clip_model_path, cache=cache)["sha256"]
    if args.feature_extractor == "inception":
        extractor_identity = {"kind": "inception", "weights_sha256": sha256_file(args.inception_weights, cache)}
    elif args.feature_extractor == "clip":
        extractor_identity = {"kind": "clip", "clip_model": clip_identity}
    else:
        extractor_identity = {"kind": "custom", **_custom_spec_identity(args.feature_extractor, cache)}

    def extractor_factory():
        return build_feature_extractor(args.feature_extractor, inception_weights=args.inception_weights,
                                       clip_embedder=clip_factory() if args.feature_extractor == "clip" else None,
                                       clip_fingerprint=clip_identity or "")

    return extractor_factory, extractor_identity, (clip_factory if args.clip_model_path else None), clip_identity


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        validate_args(args)
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(str(error)) from None
    check_output_dir(args.output_dir)
    cache = HashCache(os.path.join(args.output_dir, "hash_cache.json"))
    teacher, student, identities = build_generators(args, cache)
    extractor_factory, extractor_identity, clip_factory, clip_identity = build_metrics(args, cache)
    identities["clip_model"] = clip_identity
    config = EvaluationConfig(
        output_dir=args.output_dir, captions_file=args.captions_file, num_prompts=args.num_prompts,
        prompt_seed=args.prompt_seed, generation_seed=args.seed, height=args.height, width=args.width,
        student_steps=args.student_steps, teacher_steps=args.teacher_steps, guidance_scale=args.guidance_scale,
        teacher_dir=args.teacher_dir, batch_size=args.batch_size, feature_batch_size=args.feature_batch_size,
        feature_extractor=args.feature_extractor, fid_method=args.fid_method, show_progress=not args.no_progress)
    results = run_coco_evaluation(config, teacher, student, extractor_factory, extractor_identity,
                                  clip_factory=clip_factory, identities=identities, real_images=args.real_images_dir)
    print(json.dumps(results["metrics"], indent=1))
    print(f"results: {os.path.join(args.output_dir, 'results.json')} and results.md")
    return results
