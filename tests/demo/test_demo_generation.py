"""The text-to-image example's demo defaults: the bundled teacher folder, the quick start's newest student first."""
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from demo.config import DEMO_MODEL_DIR, STUDENT_LORA_NAME
from demo.generation import demo_student, fill_demo_defaults
from ppdiffusers_fast.inference import generate_cli

pytestmark = pytest.mark.skipif(not (DEMO_MODEL_DIR / "demo_config.json").is_file(),
                                reason="the demo model folder is not present")
SCRIPT = DEMO_MODEL_DIR.parent / "text_to_image_generation_flux_lightning.py"


def parse(argv):
    return generate_cli.build_parser().parse_args(argv)


def test_teacher_without_lora_uses_its_size_prompt_and_true_cfg(tmp_path):
    args = parse(["--path_to_lora", ""])
    fill_demo_defaults(args, output_dir=tmp_path)
    assert args.pretrained_model_name_or_path == str(DEMO_MODEL_DIR)
    assert (args.height, args.width, args.max_sequence_length) == (32, 32, 8)
    assert args.prompt == "a handwritten digit seven"
    assert args.true_cfg_scale == 3.0 and args.negative_prompt == ""


def test_fresh_quick_start_student_comes_before_the_committed_one(tmp_path):
    committed = DEMO_MODEL_DIR / STUDENT_LORA_NAME
    if not committed.is_file():
        pytest.skip("no committed demo student")
    assert demo_student(tmp_path / "absent") == committed
    fresh = tmp_path / STUDENT_LORA_NAME
    shutil.copyfile(committed, fresh)
    assert demo_student(tmp_path) == fresh
    args = parse([])
    fill_demo_defaults(args, output_dir=tmp_path)
    assert args.path_to_lora == [str(fresh)] and args.true_cfg_scale is None  # a student: CFG off (FLUX default)


def test_given_model_is_left_alone(tmp_path):
    args = parse(["--pretrained_model_name_or_path", str(tmp_path)])
    fill_demo_defaults(args)
    assert args == parse(["--pretrained_model_name_or_path", str(tmp_path)])


def test_example_script_generates_with_the_demo_by_default(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--output_dir", str(tmp_path / "images"), "--step", "2"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    paths = sorted((tmp_path / "images").glob("*.png"))
    assert [Image.open(p).size for p in paths] == [(32, 32)]


@pytest.mark.parametrize("name, steps", [("student_lora.safetensors", 4), ("student_2step_lora.safetensors", 2),
                                         ("student_1step_lora.safetensors", 1)])
def test_committed_students_sample_their_own_step_count(tmp_path, capsys, name, steps):
    lora = DEMO_MODEL_DIR / name
    if not lora.is_file():
        pytest.skip(f"no committed {name}")
    generate_cli.main(["--path_to_lora", str(lora), "--output_dir", str(tmp_path), "--benchmark", "--warmup", "0",
                       "--repeats", "1"], fill_defaults=lambda args: fill_demo_defaults(args, output_dir=tmp_path))
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("benchmark"))
    assert f"({steps} calls)" in line  # one transformer call per step, no --step given
