#!/usr/bin/env bash
# FLUX-Lightning distillation with the reference run's settings (ALGORITHMS.md, "FLUX-Lightning"):
# FLUX.1-dev teacher, LoRA rank 32, lr 5e-6, AdamW weight decay 1e-3, Huber loss, guidance 3.5, N = 100, K = 4,
# bf16 + gradient checkpointing, batch 1 per GPU, 28,652 steps, adversarial 0.1 (heads lr 1e-5), DMD 0.01,
# reflow 0.01.
#
# Variables (environment):
#   TEACHER     FLUX folder in diffusers layout (e.g. a local copy of black-forest-labs/FLUX.1-dev)   [required]
#   DATA_PATH   training data folder (e.g. laion-45w)                                                  [required]
#   FILE_LIST   list of data files relative to DATA_PATH (e.g. filelist_hwge1024_pwatermarkle0.5.txt)  [optional]
#   OUTPUT_DIR  checkpoints, logs and the final LoRA (default outputs/lora_flux_lightning)
#   GPUS        GPU ids for multi-GPU data parallel, e.g. "0,1,2,3,4,5,6,7" (unset: one process)
#   NPROC       processes per node without GPUs (CPU data parallel over gloo), e.g. 2
#   NNODES      machines in a multi-node data-parallel run (default 1); each machine runs this script with
#   NODE_RANK   its own rank 0..NNODES-1, and
#   MASTER      the rendezvous address ip:port of a free port on the rank-0 machine (the same on every machine)
#   IPS         instead of MASTER/NODE_RANK: every machine's ip, comma-separated (the node finds itself in the
#               list; START_PORT, default 6070, is the first port used on each machine)
#   LOG_DIR     where paddle.distributed.launch writes each process's log (default ./log)
#   PYTHON      the interpreter (default python)
# Any argument is passed on to the training entry point after the defaults, so it overrides them.
#
# Single GPU:
#   TEACHER=/models/FLUX.1-dev DATA_PATH=/data/laion-45w FILE_LIST=/data/filelist.txt \
#     bash scripts/train_flux_lightning.sh
# Eight GPUs (python -m paddle.distributed.launch --gpus "0,...,7" ...):
#   GPUS=0,1,2,3,4,5,6,7 TEACHER=/models/FLUX.1-dev DATA_PATH=/data/laion-45w FILE_LIST=/data/filelist.txt \
#     bash scripts/train_flux_lightning.sh
# CPU data parallel (gloo), e.g. two processes:
#   NPROC=2 TEACHER=... DATA_PATH=... bash scripts/train_flux_lightning.sh
# Two machines with 8 GPUs each (run on both; NODE_RANK=0 on the machine whose address MASTER names):
#   NNODES=2 NODE_RANK=0 MASTER=10.0.0.1:8090 GPUS=0,1,2,3,4,5,6,7 TEACHER=... DATA_PATH=... \
#     bash scripts/train_flux_lightning.sh
#   NNODES=2 NODE_RANK=1 MASTER=10.0.0.1:8090 GPUS=0,1,2,3,4,5,6,7 TEACHER=... DATA_PATH=... \
#     bash scripts/train_flux_lightning.sh
# TEACHER, DATA_PATH and OUTPUT_DIR must name the same files on every machine (a shared file system: every
# rank writes its data position into the checkpoint folder).
# The discriminator and the generator alternate as in the reference (14,326 updates each in 28,652 steps).
# Overrides, e.g. both updated at every step, or a trained fake score:
#   TEACHER=... DATA_PATH=... bash scripts/train_flux_lightning.sh --no_adv_alternate
#   TEACHER=... DATA_PATH=... bash scripts/train_flux_lightning.sh --dmd_fake_score adapter --dmd_fake_score_updates 5
# DMD2 takes other flags: call examples/flux_lightning/train_flux_lightning_lora.py --method dmd2 directly.
# No TEACHER: runs the CPU demo (python examples/flux_lightning/run_demo.py, arguments passed on) and says so.
set -euo pipefail

PYTHON=${PYTHON:-python}
TEACHER=${TEACHER:-}
DATA_PATH=${DATA_PATH:-}
FILE_LIST=${FILE_LIST:-}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/lora_flux_lightning}
GPUS=${GPUS:-}
NPROC=${NPROC:-}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-}
MASTER=${MASTER:-}
IPS=${IPS:-}
START_PORT=${START_PORT:-6070}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TRAIN_SCRIPT="$REPO_ROOT/examples/flux_lightning/train_flux_lightning_lora.py"

usage() {
  cat >&2 <<EOF
Set the teacher and the data to train FLUX-Lightning:
  TEACHER=<FLUX folder, diffusers layout, e.g. FLUX.1-dev> DATA_PATH=<data folder> \\
  [FILE_LIST=<file list>] [OUTPUT_DIR=<dir>] [GPUS=0,1,...] bash scripts/train_flux_lightning.sh [extra flags]
Several machines: NNODES=<n> NODE_RANK=<0..n-1> MASTER=<ip:port of the rank-0 machine> (or IPS=<ip,ip,...>).
The training entry point is $TRAIN_SCRIPT (see --help there).
EOF
}

DEMO_SCRIPT="$REPO_ROOT/examples/flux_lightning/run_demo.py"
if [[ -z "$TEACHER" ]]; then
  if [[ -f "$DEMO_SCRIPT" ]]; then
    echo "TEACHER is not set: running the CPU demo ($PYTHON $DEMO_SCRIPT $*; outputs in outputs/demo/)" >&2
    # The demo's matrices are too small for threads to pay: one thread per process is fastest on a small CPU.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    exec "$PYTHON" "$DEMO_SCRIPT" "$@"
  fi
  echo "error: TEACHER is not set and there is no demo at $DEMO_SCRIPT." >&2
  usage
  exit 2
fi
if [[ ! -d "$TEACHER" ]]; then
  echo "error: TEACHER=$TEACHER is not a folder (expected a FLUX folder in diffusers layout)" >&2
  exit 2
fi
if [[ -z "$DATA_PATH" ]]; then
  echo "error: DATA_PATH is not set (the training data folder)" >&2
  usage
  exit 2
fi
if [[ ! -f "$TRAIN_SCRIPT" ]]; then
  echo "error: the training entry point $TRAIN_SCRIPT does not exist" >&2
  exit 2
fi

if ! [[ "$NNODES" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: NNODES=$NNODES is not a positive number of machines" >&2
  exit 2
fi
NODE_ARGS=()
if (( NNODES > 1 )) || [[ -n "$MASTER$IPS$NODE_RANK" ]]; then
  if [[ -n "$IPS" ]]; then
    if [[ -n "$MASTER$NODE_RANK" ]]; then
      echo "error: give either IPS or MASTER with NODE_RANK, not both" >&2
      exit 2
    fi
    IFS=, read -r -a IP_LIST <<< "$IPS"
    if (( ${#IP_LIST[@]} != NNODES )) && (( NNODES > 1 )); then
      echo "error: IPS=$IPS names ${#IP_LIST[@]} machines but NNODES=$NNODES" >&2
      exit 2
    fi
    NODE_ARGS=(--ips "$IPS" --start_port "$START_PORT")
  else
    if [[ -z "$MASTER" || -z "$NODE_RANK" ]]; then
      echo "error: NNODES=$NNODES needs MASTER=<ip:port on the rank-0 machine> and NODE_RANK=<0..$((NNODES - 1))> (or IPS)" >&2
      exit 2
    fi
    if ! [[ "$MASTER" =~ ^[^:]+:[0-9]+$ ]]; then
      echo "error: MASTER=$MASTER is not ip:port" >&2
      exit 2
    fi
    if ! [[ "$NODE_RANK" =~ ^[0-9]+$ ]] || (( NODE_RANK >= NNODES )); then
      echo "error: NODE_RANK=$NODE_RANK is not in 0..$((NNODES - 1))" >&2
      exit 2
    fi
    NODE_ARGS=(--master "$MASTER" --nnodes "$NNODES" --rank "$NODE_RANK")
  fi
fi

LAUNCH=("$PYTHON" -u)
if [[ -n "$GPUS" ]]; then
  LAUNCH=("$PYTHON" -u -m paddle.distributed.launch "${NODE_ARGS[@]}" --gpus "$GPUS")
elif [[ -n "$NPROC" || ${#NODE_ARGS[@]} -gt 0 ]]; then
  LAUNCH=("$PYTHON" -u -m paddle.distributed.launch "${NODE_ARGS[@]}" --nproc_per_node "${NPROC:-1}")
fi
if [[ -n "${LOG_DIR:-}" && ${#LAUNCH[@]} -gt 2 ]]; then
  LAUNCH+=(--log_dir "$LOG_DIR")
fi

DATA_ARGS=(--data_path "$DATA_PATH")
if [[ -n "$FILE_LIST" ]]; then
  DATA_ARGS+=(--file_list_path "$FILE_LIST")
fi

exec "${LAUNCH[@]}" "$TRAIN_SCRIPT" \
  --method flux_lightning \
  --pretrained_teacher_model "$TEACHER" "${DATA_ARGS[@]}" --output_dir "$OUTPUT_DIR" \
  --mixed_precision bf16 --fp16_opt_level O2 --resolution 1024 --lora_rank 32 \
  --learning_rate 5e-6 --loss_type huber --adam_weight_decay 1e-3 --max_train_steps 28652 \
  --dataloader_num_workers 32 --guidance_scale 3.5 --validation_steps 20000 \
  --checkpointing_steps 1000 --checkpoints_total_limit 30 --train_batch_size 1 \
  --gradient_accumulation_steps 1 --resume_from_checkpoint latest --seed 453645634 \
  --num_euler_timesteps 100 --multiphase 4 --gradient_checkpointing \
  --adv_weight 0.1 --adv_lr 1e-5 --use_dmd_loss --dmd_weight 0.01 \
  --apply_reflow_loss --reflow_loss_weight 0.01 \
  "$@"
