"""Training logs: VisualDL scalars and images, a tqdm bar, the non-finite loss stop.

Scalars per update: ``loss/<name>`` for each named loss (mean over micro-batches and ranks),
``metric/<name>``, ``lr/<group>``, ``grad_norm/<group>`` (before clipping), ``time/step_seconds`` and
``time/samples_per_second``; the same step, losses, metrics, learning rates and gradient norms as plain text, one
line per update, in ``<output_dir>/train_log.txt``. Images: ``validation/<i>`` every ``validation_steps`` updates from
``training.validation.Validator``. Only rank 0 writes.
"""
import math
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; training stops and writes no new checkpoint."""

    def __init__(self, name: str, value: float, step: int):
        super().__init__(f"loss '{name}' is {value} at step {step}; training stopped, no checkpoint written "
                         f"for this step (resume from the last checkpoint with a lower learning rate or "
                         f"--max_grad_norm)")
        self.name, self.value, self.step = name, value, step


class NonFiniteWeightsError(RuntimeError):
    """An update made trainable weights NaN or infinite; training stops and writes nothing more."""

    def __init__(self, names: List[str], step: int, losses: Dict[str, float]):
        from ..models.finite import describe_non_finite

        shown = ", ".join(f"{name} {value:.6g}" for name, value in sorted(losses.items()))
        super().__init__(f"the update at step {step} made {describe_non_finite(names)} NaN or infinite "
                         f"(losses at that step: {shown}); training stopped and nothing was written for it, so the "
                         f"newest checkpoint holds finite weights (resume from it with a lower --learning_rate or "
                         f"--max_grad_norm)")
        self.names, self.step, self.losses = names, step, losses


def check_finite(losses: Dict[str, float], step: int) -> None:
    """Raise :class:`NonFiniteLossError` naming the first NaN/inf loss."""
    for name, value in losses.items():
        if not math.isfinite(value):
            raise NonFiniteLossError(name, value, step)


class TrainingLogger:
    """VisualDL writer (rank 0, ``report_to="visualdl"``) plus a tqdm progress bar."""

    def __init__(self, log_dir: Optional[str], enabled: bool, total_steps: int, initial_step: int = 0,
                 report_to: str = "visualdl", run_name: str = "train", text_log: Optional[str] = None):
        self.enabled = enabled
        self.writer = None
        # plain text, one line per update (step, losses, metrics, learning rates, gradient norms) and every message;
        # appended to, so a resumed run continues the same file
        self.text = open(text_log, "a", encoding="utf-8") if enabled and text_log else None
        if enabled and report_to == "visualdl" and log_dir:
            from visualdl import LogWriter

            self.writer = LogWriter(logdir=log_dir, display_name=run_name)
        elif report_to not in ("visualdl", "none"):
            raise ValueError(f"--report_to must be visualdl or none, got {report_to!r}")
        interactive = sys.stderr.isatty()
        self.bar = tqdm(total=total_steps, initial=initial_step, desc="Steps", disable=not enabled,
                        dynamic_ncols=interactive, mininterval=0.1 if interactive else 30.0)
        self.history: List[Dict[str, float]] = []

    def log_scalars(self, step: int, scalars: Dict[str, float]) -> None:
        self.history.append(dict(scalars, step=step))
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag=tag, value=float(value), step=step)
        losses = {k.split("/", 1)[1]: v for k, v in scalars.items() if k.startswith("loss/")}
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in losses.items()}, refresh=False)
        self.bar.update(1)
        if self.text is not None:
            shown = [k for k in sorted(scalars) if k.split("/", 1)[0] in ("loss", "metric", "lr", "grad_norm")]
            self.text.write(f"step {step} " + " ".join(f"{k}={float(scalars[k]):.6g}" for k in shown) + "\n")
            self.text.flush()

    def log_images(self, step: int, tag: str, images: Sequence[np.ndarray]) -> None:
        """``images``: ``[H, W, 3]`` uint8 arrays."""
        if self.writer is None:
            return
        for i, image in enumerate(images):
            self.writer.add_image(tag=f"{tag}/{i}", img=image, step=step)

    def message(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text)
        if self.text is not None:
            self.text.write(text + "\n")
            self.text.flush()

    def close(self) -> None:
        self.bar.close()
        if self.text is not None:
            self.text.close()
            self.text = None
        if self.writer is not None:
            self.writer.close()
