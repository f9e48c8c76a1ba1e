"""Encode training images once into a latent / embedding cache (VAE latents, T5 and CLIP embeddings).

    python scripts/build_latent_cache.py --pretrained_model_name_or_path /models/FLUX.1-dev \
        --data_path laion_1024_shards --output_dir laion_1024_cache --resolution 1024 --max_sequence_length 512
    # several processes, each encoding a disjoint part (GPUs: --gpus 0,1,...; CPU: --nproc_per_node N):
    python -m paddle.distributed.launch --gpus 0,1,2,3 scripts/build_latent_cache.py ...

Single files instead of the folder's encoders: ``--vae_file ae.safetensors --clip_l_file clip_l.safetensors
--t5_file t5xxl_fp16.safetensors`` with ``--pretrained_model_name_or_path`` naming the folder with the tokenizers.
``--data_path``: tar shards (``scripts/download_laion_images.py``), an image folder with ``.txt`` captions, or
base64 line files with ``--file_list_path``. Images are scaled and centre-cropped to ``--resolution``. Train on
the cache with ``--data_path <output_dir>``. Running the same command again goes on where a killed run stopped;
a finished cache is left as it is. Bad records are counted (summary in ``cache_index.json``) and stop the run
past ``--max_bad_fraction`` as in training. Details: ``ppdiffusers_fast/data/cache_builder.py``.
"""
import argparse
import json
import sys
from pathlib import Path

from ppdiffusers_fast.data.bad_records import TooManyBadRecordsError
from ppdiffusers_fast.data.cache_builder import CacheSettings, build_latent_cache
from ppdiffusers_fast.data.sources import IMAGE_LAYOUTS, TeacherEncoders, detect_path_layout, image_reader
from ppdiffusers_fast.pipelines.model_files import FILE_HELP, single_files
from ppdiffusers_fast.training import distributed as dist


ENCODER_FILE_KINDS = ("vae", "clip_l", "t5")


def teacher_encoders(args) -> TeacherEncoders:
    """The VAE and text encoders the flags name (ValueError naming the flag or path when incomplete)."""
    from ppdiffusers_fast.models.flux_folder import check_flux_folder

    files = single_files(args, kinds=ENCODER_FILE_KINDS)
    if files:
        folder = check_flux_folder(args.pretrained_model_name_or_path, require=("tokenizer", "tokenizer_2"),
                                   need_index=False)
        return TeacherEncoders(Path(folder), *(files[kind] for kind in ENCODER_FILE_KINDS))
    encoders = TeacherEncoders(Path(args.pretrained_model_name_or_path))
    if not (encoders.has_vae() and encoders.has_text_encoders()):
        raise ValueError(f"{encoders} is not a FLUX folder with vae/, text_encoder/, text_encoder_2/, tokenizer/ "
                         f"and tokenizer_2/ (or give --vae_file --clip_l_file --t5_file)")
    return encoders


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", required=True,
                        help="FLUX folder (diffusers layout) with vae/, text_encoder/, text_encoder_2/, tokenizers; "
                             "with the single-file flags, the folder with tokenizer/ and tokenizer_2/")
    for kind in ENCODER_FILE_KINDS:
        parser.add_argument(f"--{kind}_file", default=None, metavar="FILE",
                            help=FILE_HELP[kind] + "; --vae_file, --clip_l_file and --t5_file go together")
    parser.add_argument("--data_path", required=True)
    parser.add_argument("--file_list_path", default=None, help="base64 line files only")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--resolution", type=int, default=1024, help="square training size in pixels")
    parser.add_argument("--max_sequence_length", type=int, default=512, help="T5 tokens")
    parser.add_argument("--batch_size", type=int, default=8, help="images per encoder call")
    parser.add_argument("--samples_per_shard", type=int, default=256, help="records per cache shard (and per resume step)")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="stored dtype")
    parser.add_argument("--max_bad_fraction", type=float, default=0.05)
    parser.add_argument("--min_records", type=int, default=100)
    parser.add_argument("--no_progress", action="store_true")
    return parser.parse_args(argv)


def _describe(encoders: TeacherEncoders) -> str:
    """The encoders as recorded in the cache's settings: the folder, or the three files (absolute paths)."""
    if not encoders.single_files:
        return str(encoders.folder.resolve())
    return ", ".join(str(path.resolve()) for path in (encoders.vae_file, encoders.clip_l_file, encoders.t5_file))


def main(argv=None):
    args = parse_args(argv)
    try:
        encoders = teacher_encoders(args)
        layout = detect_path_layout(args.data_path, args.file_list_path)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if layout not in IMAGE_LAYOUTS:
        print(f"error: --data_path {args.data_path} is a {layout.replace('_', ' ')}, already encoded", file=sys.stderr)
        return 2
    if args.resolution % 16:
        print(f"error: --resolution {args.resolution} is not a multiple of 16", file=sys.stderr)
        return 2
    dist.init_distributed()
    rank, world = dist.rank(), dist.world_size()
    reader = image_reader(args.data_path, args.file_list_path, layout)
    settings = CacheSettings(data_path=str(Path(args.data_path).resolve()), layout=layout, num_records=len(reader),
                             resolution=args.resolution, max_sequence_length=args.max_sequence_length,
                             teacher=_describe(encoders), world_size=world, samples_per_shard=args.samples_per_shard,
                             batch_size=args.batch_size, dtype=args.dtype, max_bad_fraction=args.max_bad_fraction,
                             min_records=args.min_records)
    from ppdiffusers_fast.data.encoders import VaeLatentEncoder
    from ppdiffusers_fast.data.transforms import TrainTransform

    image_encoder = VaeLatentEncoder(encoders.vae())
    text_encoder = encoders.text_encoder(args.max_sequence_length)
    try:
        index = build_latent_cache(reader, TrainTransform(args.resolution), image_encoder, text_encoder,
                                   args.output_dir, settings, rank, dist.barrier, not args.no_progress)
    except TooManyBadRecordsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    except ValueError as error:  # settings differ from the folder's first run
        print(f"error: {error}", file=sys.stderr)
        return 2
    dist.finish_distributed()
    if index is not None:
        print(json.dumps({"num_samples": index["num_samples"], "shards": len(index["shards"]),
                          "bad_records": index["bad_records"], "seconds": index["metadata"].get("seconds")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
