"""One rank of the 2-process data-parallel PCM run of test_distributed.py (launched by paddle.distributed.launch).

Every rank builds the same frozen tiny FLUX but a *different* initial adapter (seeded by rank), reads its
own data shard and draws its own noise; the trainer must broadcast the adapter from rank 0 and average
gradients, so both ranks end with identical adapters. Each rank writes its adapter to rank-<r>.safetensors.
"""
import sys
from pathlib import Path

import paddle

sys.path.insert(0, str(Path(__file__).parent))

from training_toys import TINY_LORA, latent_stream, tiny_flux  # noqa: E402

from ppdiffusers_fast.methods.denoiser import FluxDenoiser  # noqa: E402
from ppdiffusers_fast.methods.base import FewStepSchedule  # noqa: E402
from ppdiffusers_fast.methods.pcm import PCM  # noqa: E402
from ppdiffusers_fast.training import distributed as dist  # noqa: E402
from ppdiffusers_fast.training.checkpoint import save_arrays  # noqa: E402
from ppdiffusers_fast.training.config import train_config  # noqa: E402
from ppdiffusers_fast.training.trainer import Trainer  # noqa: E402


def main(output_dir: str) -> None:
    dist.init_distributed()
    rank, world = dist.rank(), dist.world_size()
    transformer = tiny_flux(seed=0)
    paddle.seed(100 + rank)  # different initial adapters on purpose
    method = PCM(FluxDenoiser(transformer), TINY_LORA, FewStepSchedule(num_euler_timesteps=8, multiphase=2))
    settings = train_config(output_dir=output_dir, max_train_steps=4, checkpointing_steps=2, seed=7,
                            report_to="none", learning_rate=5e-3, resume_from_checkpoint=None)
    Trainer(method, latent_stream(num_samples=8, batch_size=2, rank=rank, world_size=world), settings).train()
    arrays = {name: t.numpy() for name, t in method.checkpoint_tensors().items()}
    save_arrays(arrays, Path(output_dir) / f"rank-{rank}.safetensors")
    dist.finish_distributed()  # leave together: a rank whose peer has already exited can abort in gloo's teardown


if __name__ == "__main__":
    main(sys.argv[1])
