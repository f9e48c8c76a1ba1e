"""Distil FLUX into a few-step LoRA student: FLUX-Lightning by default, PCM and DMD2 through --method.

Accepts the command line of PaddleMIX's FLUX-Lightning training script (see ALGORITHMS.md); flags that
script parses but this library does not implement are refused with a message naming them.

    # one process (CPU runs in fp32)
    python examples/flux_lightning/train_flux_lightning_lora.py --method pcm \\
        --pretrained_teacher_model /path/to/FLUX.1-dev --data_path /path/to/latent_cache \\
        --output_dir outputs/lora_pcm --resolution 1024 --lora_rank 32 --learning_rate 5e-6 \\
        --loss_type huber --num_euler_timesteps 100 --multiphase 4 --guidance_scale 3.5 \\
        --max_train_steps 28652 --checkpointing_steps 1000 --checkpoints_total_limit 30 \\
        --resume_from_checkpoint latest --gradient_checkpointing --mixed_precision bf16

    # data parallel: python -m paddle.distributed.launch --gpus "0,1,2,3,4,5,6,7" <this script> ...
    #                (CPU: --nproc_per_node 2)

Everything is in the library: ``training.config`` (flags), ``training.launch.run_training``.
"""
import sys

from ppdiffusers_fast.command_line import quiet_third_party, run_command

quiet_third_party()  # before paddle is imported; --verbose keeps the third-party warnings
from ppdiffusers_fast.training.config import config_from_args  # noqa: E402
from ppdiffusers_fast.training.launch import run_training  # noqa: E402
from ppdiffusers_fast.training.logging import NonFiniteLossError, NonFiniteWeightsError  # noqa: E402


def main(argv=None):
    config = config_from_args(argv)
    result = run_training(config)
    print(f"finished at step {result.step}; last losses {result.losses}")
    return result


if __name__ == "__main__":
    try:
        run_command(main, sys.argv[1:])
    except (NonFiniteLossError, NonFiniteWeightsError) as error:  # the run stopped cleanly: say why, exit 1
        sys.exit(f"error: {error}")
