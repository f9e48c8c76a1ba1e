"""Import cost of ``ppdiffusers_fast.losses`` against ``import paddle``, each in fresh processes, interleaved.

    python scripts/benchmark_import.py --runs 7

Prints the median wall time of each import (one new interpreter per run, so no module is cached) and their
ratio. The package applies its ppdiffusers compatibility patches only in the modules that use ppdiffusers, so
the pure losses should cost little more than Paddle itself.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

STATEMENTS = {"paddle": "import paddle", "ppdiffusers_fast.losses": "import ppdiffusers_fast.losses"}


def time_import(statement: str) -> float:
    started = time.perf_counter()
    # run outside any checkout, so that PYTHONPATH (or the installed package) decides what is imported
    subprocess.run([sys.executable, "-c", statement], check=True, env=dict(os.environ), cwd=tempfile.gettempdir(),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="fresh processes per import (interleaved)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs must be >= 1, got {args.runs}")
    seconds = {name: [] for name in STATEMENTS}
    time_import("import paddle")  # warm the file-system cache once
    for _ in range(args.runs):
        for name, statement in STATEMENTS.items():
            seconds[name].append(time_import(statement))
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    for name, values in seconds.items():
        print(f"import {name:<24} median {medians[name]:.2f} s  runs {' '.join(f'{v:.2f}' for v in values)}")
    ratio = medians["ppdiffusers_fast.losses"] / medians["paddle"]
    print(f"ratio losses / paddle: {ratio:.2f}")
    return {"medians": medians, "ratio": ratio}


if __name__ == "__main__":
    main()
