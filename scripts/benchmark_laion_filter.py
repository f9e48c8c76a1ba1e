"""Peak memory of the LAION filter on a generated metadata file of >= 1M rows.

    python scripts/benchmark_laion_filter.py --rows 1000000 --row_group_rows 131072

Writes a laion-aesthetics-v2-like parquet file (URL, TEXT, WIDTH, HEIGHT, similarity, punsafe,
pwatermark, AESTHETIC_SCORE; ~5% duplicate URLs, a few nulls and NaNs), then runs
``scripts/filter_laion_aesv2.py`` on it in a child process and prints that process's peak resident
memory (Linux ``VmHWM``) next to the peak of a child that only imports the same modules (the
baseline), so the difference is what filtering itself costs.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "filter_laion_aesv2.py")
WORDS = np.array(("a photo of the red blue old new small large dog cat house tree mountain river city street "
                  "portrait painting sunset beach forest car woman man child flower garden night winter summer "
                  "with in on at near and modern vintage abstract wooden golden").split())


def generate_chunk(rng, start, count):
    ids = np.arange(start, start + count)
    duplicate = rng.random(count) < 0.05
    ids[duplicate] = rng.integers(0, max(start + 1, 1), duplicate.sum())
    url = pc.binary_join_element_wise("https://images.example.com/photos/", pa.array(ids).cast(pa.string()),
                                      "/full-size.jpg", "")
    words = [pa.array(WORDS[rng.integers(0, len(WORDS), count)]) for _ in range(8)]
    text = pc.binary_join_element_wise(*words, " ")
    sizes = np.array([256, 512, 768, 1024, 1200, 1536, 2048, 4096], dtype=np.float64)
    width = sizes[rng.integers(0, len(sizes), count)]
    height = sizes[rng.integers(0, len(sizes), count)]
    width[rng.random(count) < 0.001] = np.nan
    return pa.table({
        "URL": url, "TEXT": text, "WIDTH": width, "HEIGHT": height,
        "similarity": rng.uniform(0.2, 0.45, count),
        "punsafe": rng.beta(1, 20, count),
        "pwatermark": rng.beta(1, 3, count),
        "AESTHETIC_SCORE": rng.normal(6.0, 0.6, count),
    })


def generate(path, rows, row_group_rows, seed=0):
    rng = np.random.default_rng(seed)
    chunk_rows = min(row_group_rows, 262144)
    writer = None
    for start in range(0, rows, chunk_rows):
        table = generate_chunk(rng, start, min(chunk_rows, rows - start))
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=row_group_rows)
    writer.close()


PEAK_PROBE = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__") if sys.argv[0] != "-" else None
    code = 0
except SystemExit as stop:
    code = stop.code or 0
status = open("/proc/self/status").read().split("VmHWM:")[1].split()[0]
print("PEAK_RSS_KB", status)
sys.exit(code)
"""


def child_peak_rss_mb(script_and_args, imports=""):
    """Run a script in a child process; return (its peak RSS in MiB, seconds, its stdout before the probe).

    The peak is the child's own ``VmHWM`` (Linux), which starts afresh at ``exec``; ``getrusage``
    would also count the parent's memory copied at ``fork``.
    """
    start = time.time()
    done = subprocess.run([sys.executable, "-c", imports + PEAK_PROBE] + script_and_args,
                          capture_output=True, text=True)
    seconds = time.time() - start
    if done.returncode != 0:
        raise RuntimeError(f"{script_and_args} failed:\n{done.stderr[-3000:]}")
    stdout, _, probe = done.stdout.rpartition("PEAK_RSS_KB")
    return int(probe.split()[0]) / 1024.0, seconds, stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--row_group_rows", type=int, default=131072)
    parser.add_argument("--batch_rows", type=int, default=65536)
    parser.add_argument("--workdir", default=None, help="default: a temporary folder, removed afterwards")
    args = parser.parse_args()
    if args.rows < 1_000_000:
        print(f"note: {args.rows} rows is below the 1M rows the benchmark is meant for")
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        path = os.path.join(workdir, "laion_meta.parquet")
        start = time.time()
        generate(path, args.rows, args.row_group_rows)
        print(f"generated {args.rows} rows ({os.path.getsize(path) / 2**20:.1f} MiB on disk, row groups of "
              f"{args.row_group_rows}) in {time.time() - start:.1f} s")
        baseline, _, _ = child_peak_rss_mb(["-"], imports="import ppdiffusers_fast.data.laion_filter, tqdm\n")
        peak, seconds, stdout = child_peak_rss_mb(
            [SCRIPT, "--input", path, "--output_dir", os.path.join(workdir, "out"),
             "--batch_rows", str(args.batch_rows), "--no_progress"])
        result = json.loads(stdout)
        print(f"rows read {result['rows_read']}, kept {result['rows_kept']}, "
              f"duplicates removed {result['removed_by_rule']['url_duplicate']}")
        print(f"filter time {seconds:.1f} s ({result['rows_read'] / seconds / 1e6:.2f} M rows/s incl. start-up)")
        print(f"peak RSS: filter process {peak:.0f} MiB, import-only baseline {baseline:.0f} MiB, "
              f"filtering itself {peak - baseline:.0f} MiB")


if __name__ == "__main__":
    main()
