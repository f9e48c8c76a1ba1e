"""A tiny PCM run (a checkpoint after every update, resume from the latest) that kills itself on request.

    python fault_worker.py OUTPUT_DIR [KILL_AT]

Counts events: before and after every checkpoint file write and every rename, and after every update. At event
number KILL_AT it sends itself SIGKILL; a kill at the end of a file write first cuts that file to half its size
(a torn write). Without KILL_AT the run finishes, exports the student LoRA and prints the number of events.
"""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from training_toys import latent_stream, tiny_pcm  # noqa: E402

import ppdiffusers_fast.training.checkpoint as ckpt  # noqa: E402
from ppdiffusers_fast.training.config import train_config  # noqa: E402
from ppdiffusers_fast.training.trainer import Trainer  # noqa: E402

STEPS = 5
KILL_AT = int(sys.argv[2]) if len(sys.argv) > 2 else 0
events = 0


def event(written_file=None):
    global events
    events += 1
    if events == KILL_AT:
        if written_file is not None and Path(written_file).is_file():
            data = Path(written_file).read_bytes()
            Path(written_file).write_bytes(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)


def counted_writer(write):
    def wrapped(payload, path):
        event()
        write(payload, path)
        event(written_file=path)
    return wrapped


real_replace = os.replace


def counted_replace(src, dst):
    event()
    real_replace(src, dst)
    event()


ckpt.save_arrays = counted_writer(ckpt.save_arrays)
ckpt.write_json = counted_writer(ckpt.write_json)
ckpt.os.replace = counted_replace

method = tiny_pcm(ema_decay=0.8)
real_after_update = method.after_update


def after_update_then_count(step, groups):
    real_after_update(step, groups)
    event()


method.after_update = after_update_then_count
config = train_config(output_dir=sys.argv[1], max_train_steps=STEPS, checkpointing_steps=1, checkpoints_total_limit=2,
                      learning_rate=1e-3, seed=5, report_to="none", resume_from_checkpoint="latest")
Trainer(method, latent_stream(), config).train()
ckpt.os.replace = real_replace
method.export(sys.argv[1])
print(f"events {events}")
