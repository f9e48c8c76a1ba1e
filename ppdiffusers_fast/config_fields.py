"""The one way to declare a config field that is also a command-line flag.

    loss_type: str = flag("huber", "consistency loss: huber or l2", choices=["huber", "l2"])

``training.config.build_parser`` turns every such field into ``--loss_type`` with this help text; ``extra``
metadata (e.g. ``choices``) is passed on to argparse.
"""
from dataclasses import field

__all__ = ["flag"]


def flag(default, help, **extra):
    """A dataclass field with ``default`` whose ``help`` text doubles as the command-line help."""
    return field(default=default, metadata={"help": help, **extra})
