"""Defaults of the text-to-image example when no model is given: the bundled demo teacher and a demo student.

``examples/flux_lightning/text_to_image_generation_flux_lightning.py`` with no ``--pretrained_model_name_or_path``
generates with the demo folder (``config.DEMO_MODEL_DIR``) and, with no ``--path_to_lora``, the student the quick
start trained last (``outputs/demo/student_lora.safetensors`` under the working directory) or else the committed
one (``demo_model/student_lora.safetensors``). Image size, T5 length and the prompt ("a handwritten digit seven")
come from the folder's ``demo_config.json``; without a LoRA the teacher samples with its own true CFG against the
empty prompt, while a student has the guidance built in (CFG off).
"""
from pathlib import Path
from typing import Optional, Union

from .config import DEMO_MODEL_DIR, QUICK_START_OUTPUT_DIR, STUDENT_LORA_NAME
from .teacher import read_demo_config

__all__ = ["demo_student", "fill_demo_defaults"]

DEMO_PROMPT_DIGIT = 7


def demo_student(output_dir: Union[str, Path] = QUICK_START_OUTPUT_DIR,
                 folder: Union[str, Path] = DEMO_MODEL_DIR) -> Optional[Path]:
    """The quick start's freshly trained student in ``output_dir`` if there is one, else the committed one."""
    for candidate in (Path(output_dir) / STUDENT_LORA_NAME, Path(folder) / STUDENT_LORA_NAME):
        if candidate.is_file():
            return candidate
    return None


def fill_demo_defaults(args, folder: Union[str, Path] = DEMO_MODEL_DIR,
                       output_dir: Union[str, Path] = QUICK_START_OUTPUT_DIR) -> None:
    """Fill unset flags of the generation command line (``argparse.Namespace``) for the demo model.

    Does nothing when a model folder was given or when ``folder`` is absent.
    """
    if args.pretrained_model_name_or_path is not None or not Path(folder).is_dir():
        return
    args.pretrained_model_name_or_path = str(folder)
    if args.path_to_lora is None:
        student = demo_student(output_dir, folder)
        args.path_to_lora = None if student is None else [str(student)]
    demo = read_demo_config(folder)
    defaults = {"height": demo["height"], "width": demo["width"], "max_sequence_length": demo["max_sequence_length"],
                "prompt": demo["prompts"][DEMO_PROMPT_DIGIT]}
    if not args.path_to_lora and demo.get("guidance") == "true_cfg":
        defaults.update(true_cfg_scale=float(demo["guidance_scale"]), negative_prompt=demo.get("negative_prompt", ""))
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
