#!/usr/bin/env bash
# The demo's ablation table: the teacher at 50 steps with other seeds (noise floor), the
# teacher at 4 Euler steps, PCM, PCM + adversarial, PCM + adversarial + DMD (student fake score), the full
# FLUX-Lightning recipe and DMD2 (adapter fake score), each distilled from the bundled tiny teacher with the same
# data, seed and step budget, measured on the same evaluation seeds.
#
#   bash scripts/demo_ablation.sh                                 # -> outputs/demo_ablation/ablation.{md,json,png}
#   bash scripts/demo_ablation.sh --max_train_steps 100           # a shorter budget
#   bash scripts/demo_ablation.sh --rows pcm,flux_lightning       # some rows only
#
# Rerunning with the same --output_dir resumes each student from its newest checkpoint.
# Variables: PYTHON (default python), OMP_NUM_THREADS (default 1: the tiny model's matrices are too small for
# threads to pay; two threads on a busy 2-core machine made each step 3x slower).
set -euo pipefail
PYTHON=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PYTHON" "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/examples/flux_lightning/run_demo_ablation.py" "$@"
