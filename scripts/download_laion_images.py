"""Download the images of a filtered LAION URL list into webdataset tar shards (img2dataset).

    python scripts/download_laion_images.py --input laion_1024 --output_dir laion_1024_shards \
        [--image_size 1024 --processes 4 --threads 64 --samples_per_shard 10000 --timeout 10 --retries 0]

``--input``: the output folder of ``scripts/filter_laion_aesv2.py`` (its ``filelist.txt`` is followed) or
parquet files / globs with URL and caption columns. Needs ``pip install -e ".[data]"``. Writes
``NNNNN.tar`` shards (``<key>.jpg`` + ``<key>.txt`` + ``<key>.json``) and ``download_summary/summary.{json,md}``
(URLs per outcome: downloaded, http_or_network, not_an_image, too_small, other_error). Images keep their
aspect ratio; a short side above ``--image_size`` is scaled down to it, a smaller one is counted, not
upscaled. Rerunning the same command downloads only the shards not finished yet. The policy and the
outcomes are documented in ``ppdiffusers_fast/data/download.py``.
"""
import argparse
import json
import sys

from ppdiffusers_fast.data.download import DownloadConfig, DownloadInputError, download_laion_images
from ppdiffusers_fast.data.laion_columns import LaionColumnError


def parse_args(argv=None):
    defaults = DownloadConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, nargs="+",
                        help="filter output folder, parquet file(s), folder(s) or glob(s)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--image_size", type=int, default=defaults.image_size,
                        help="minimum short side in pixels; larger images are scaled down to it")
    parser.add_argument("--processes", type=int, default=defaults.processes)
    parser.add_argument("--threads", type=int, default=defaults.threads, help="download threads per process")
    parser.add_argument("--samples_per_shard", type=int, default=defaults.samples_per_shard)
    parser.add_argument("--timeout", type=float, default=defaults.timeout, help="seconds per request")
    parser.add_argument("--retries", type=int, default=defaults.retries)
    parser.add_argument("--encode_format", choices=("jpg", "png", "webp"), default=defaults.encode_format)
    parser.add_argument("--encode_quality", type=int, default=defaults.encode_quality)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    config = DownloadConfig(image_size=args.image_size, processes=args.processes, threads=args.threads,
                            samples_per_shard=args.samples_per_shard, timeout=args.timeout, retries=args.retries,
                            encode_format=args.encode_format, encode_quality=args.encode_quality)
    try:
        summary = download_laion_images(args.input, args.output_dir, config)
    except (DownloadInputError, LaionColumnError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({key: summary[key] for key in ("outcomes", "urls_counted", "shards_finished",
                                                     "shards_expected", "seconds")}, indent=2))
    print(f"summary: {args.output_dir}/download_summary/summary.md")
    return 1 if summary["shards_unfinished"] else 0


if __name__ == "__main__":
    sys.exit(main())
