"""Train the miniature FLUX teacher of the demo and write its FLUX.1-dev-layout folder.

    OMP_NUM_THREADS=2 python scripts/demo_train_teacher.py            # -> examples/flux_lightning/demo_model

Writes model_index.json, scheduler/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, vae/,
transformer/ (PyTorch-layout safetensors), digit_classifier.safetensors, demo_config.json, train_log.txt and
teacher_samples.png. See examples/flux_lightning/demo/train_teacher.py for the stages.
"""
import argparse
import shlex
import sys
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "flux_lightning"))

from demo.config import DEMO_MODEL_DIR, TeacherTrainingConfig  # noqa: E402  (the demo is example code)
from demo.train_teacher import train_demo_teacher  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default=str(DEMO_MODEL_DIR), help="folder to write (replaced when complete)")
    for field in fields(TeacherTrainingConfig):  # one flag per training setting, defaults from the dataclass
        if isinstance(field.default, tuple):
            parser.add_argument(f"--{field.name}", type=int, nargs="+", default=list(field.default))
        else:
            parser.add_argument(f"--{field.name}", type=type(field.default), default=field.default)
    return parser


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in fields(TeacherTrainingConfig)}
    train_cfg = TeacherTrainingConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + list(argv if argv is not None
                                                                                   else sys.argv[1:]))
    result = train_demo_teacher(args.output_dir, train_cfg=train_cfg, command=command)
    print(f"wrote {result['folder']} in {result['total_s']:.0f}s; classifier test accuracy "
          f"{result['classifier_test_accuracy']:.3f}; teacher adherence 50 steps "
          f"{result['metrics']['adherence_50_steps']:.3f}, 4 steps {result['metrics']['adherence_4_steps']:.3f}")
    return result


if __name__ == "__main__":
    main()
