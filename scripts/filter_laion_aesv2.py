"""Filter LAION-aesthetics-v2 metadata parquet files into the FLUX-Lightning training subset.

Example (the FLUX-Lightning set: width and height >= 1024, aesthetic score > 6, watermark < 0.5):

    python scripts/filter_laion_aesv2.py --input "laion_aes_v2/*.parquet" --output_dir laion_1024

Writes ``part-NNNNN.parquet`` (columns url, caption, width, height, aesthetic_score, pwatermark,
punsafe, similarity), ``filelist.txt``, ``summary.json`` and ``summary.md`` into ``--output_dir``.
The rules and their order are documented in ``ppdiffusers_fast/data/laion_filter.py``.
"""
import argparse
import json
import logging
import sys

from ppdiffusers_fast.data.laion_columns import LaionColumnError
from ppdiffusers_fast.data.laion_filter import LaionFilterConfig, LaionFilterError, filter_laion


def optional_float(text):
    """A float, or ``off``/``none`` for a disabled rule."""
    return None if text.lower() in ("off", "none") else float(text)


def parse_args(argv=None):
    defaults = LaionFilterConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, nargs="+",
                        help="parquet file(s), folder(s) (searched recursively) or glob(s)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--min_width", type=int, default=defaults.min_width, help="keep width >= this; 0 = off")
    parser.add_argument("--min_height", type=int, default=defaults.min_height, help="keep height >= this; 0 = off")
    parser.add_argument("--min_aesthetic", type=optional_float, default=defaults.min_aesthetic,
                        help="keep aesthetic score strictly greater than this; 'off' = no rule")
    parser.add_argument("--max_pwatermark", type=float, default=defaults.max_pwatermark,
                        help="keep watermark probability strictly below this; 1.0 = off")
    parser.add_argument("--max_punsafe", type=float, default=defaults.max_punsafe,
                        help="keep unsafe probability strictly below this; 1.0 (default) = off")
    parser.add_argument("--min_caption_chars", type=int, default=defaults.min_caption_chars)
    parser.add_argument("--max_caption_chars", type=int, default=defaults.max_caption_chars, help="0 = no limit")
    parser.add_argument("--no_dedup", action="store_true", help="keep rows with a URL seen before")
    parser.add_argument("--batch_rows", type=int, default=defaults.batch_rows,
                        help="rows per streamed batch; memory grows with this")
    parser.add_argument("--rows_per_output_file", type=int, default=defaults.rows_per_output_file)
    parser.add_argument("--skip_bad_files", action="store_true",
                        help="skip unreadable (e.g. truncated) parquet files instead of stopping")
    parser.add_argument("--no_progress", action="store_true")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    config = LaionFilterConfig(
        min_width=args.min_width, min_height=args.min_height, min_aesthetic=args.min_aesthetic,
        max_pwatermark=args.max_pwatermark, max_punsafe=args.max_punsafe,
        min_caption_chars=args.min_caption_chars, max_caption_chars=args.max_caption_chars,
        deduplicate_urls=not args.no_dedup, batch_rows=args.batch_rows,
        rows_per_output_file=args.rows_per_output_file, skip_bad_files=args.skip_bad_files)
    try:
        summary = filter_laion(args.input, args.output_dir, config, progress=not args.no_progress)
    except (LaionFilterError, LaionColumnError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({key: summary[key] for key in ("rows_read", "rows_kept", "removed_by_rule")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
