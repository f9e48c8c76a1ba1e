"""How the demo's 4-step student carries a style LoRA: the style's velocity change, student vs guided teacher.

Along teacher + style trajectories (50 Euler steps, true CFG w, ``--images`` prompts of all digits), at every
``--every``-th level ``s`` the script compares two velocity changes caused by the style adapter Y
(tensors ``[B, L_img, 64]``, norms as root mean squares):

    guided change   d_T = (v_u^Y + w (v_c^Y - v_u^Y)) - (v_u + w (v_c - v_u)) = w d_c - (w - 1) d_u
    student change  d_S = v_c^{S+Y} - v_c^S                      (the student samples conditional only)

with ``d_c = v_c^Y - v_c``, ``d_u = v_u^Y - v_u``. A student that carries the style as the teacher does has
``|d_S| / |d_T| = 1`` and cosine 1; a ratio above 1 means the student amplifies the style at that level (the
style scale below 1 compensates for it). Prints one line per level.

    python scripts/demo_style_velocity.py --style_lora outputs/style_lora/style_lora.safetensors
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import paddle

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples" / "flux_lightning"))

from demo.config import DEMO_MODEL_DIR  # noqa: E402
from demo.report import load_student  # noqa: E402
from demo.teacher import DemoTeacher, euler_sigmas  # noqa: E402
from ppdiffusers_fast.models.lora import use_adapters  # noqa: E402
from ppdiffusers_fast.models.lora_io import import_lora  # noqa: E402


def rms(x: paddle.Tensor) -> float:
    return float(paddle.sqrt((x ** 2).mean()))


def cosine(a: paddle.Tensor, b: paddle.Tensor) -> float:
    return float((a * b).sum() / paddle.sqrt((a ** 2).sum() * (b ** 2).sum()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--style_lora", required=True)
    p.add_argument("--student_lora", default=str(DEMO_MODEL_DIR / "student_lora.safetensors"))
    p.add_argument("--teacher", default=str(DEMO_MODEL_DIR))
    p.add_argument("--images", type=int, default=100, help="trajectories (digits 0-9 in turn)")
    p.add_argument("--first_seed", type=int, default=5000)
    p.add_argument("--every", type=int, default=8, help="measure at every n-th of the 50 levels (and the last)")
    args = p.parse_args(argv)
    for path in (args.style_lora, args.student_lora):
        if not Path(path).is_file():
            p.error(f"LoRA file not found: {path}")

    teacher = DemoTeacher.from_folder(args.teacher)
    import_lora(teacher.transformer, args.style_lora, "style")
    load_student(teacher, args.student_lora, "student")
    labels = np.arange(args.images) % 10
    cond = teacher.prompts.take(labels)
    uncond = teacher.prompts.take(np.full_like(labels, 10))  # the empty prompt
    w = teacher.guidance_scale

    def velocity(x, s, prompt, *adapters):
        level = paddle.full([x.shape[0]], s, "float32")
        with use_adapters(teacher.transformer, *adapters):
            return teacher.transformer(x, prompt[0], prompt[1], level, teacher.img_ids, teacher.txt_ids, None,
                                       return_dict=False)[0]

    sigmas = euler_sigmas(50, teacher.image_tokens)
    x = teacher.initial_noise(list(range(args.first_seed, args.first_seed + args.images)))
    print(f"guidance w = {w:g}; {args.images} trajectories of teacher + style, 50 Euler steps")
    with paddle.no_grad():
        for i in range(50):
            s = sigmas[i]
            v_c_style, v_u_style = velocity(x, s, cond, "style"), velocity(x, s, uncond, "style")
            if i % args.every == 0 or i == 49:
                d_c = v_c_style - velocity(x, s, cond)
                d_u = v_u_style - velocity(x, s, uncond)
                guided = w * d_c - (w - 1.0) * d_u
                student = velocity(x, s, cond, "student", "style") - velocity(x, s, cond, "student")
                print(f"s = {s:.3f}: |d_T| = {rms(guided):.3f}, |d_S| = {rms(student):.3f}, |d_S| / |d_T| = "
                      f"{rms(student) / rms(guided):.2f}, cos(d_S, d_T) = {cosine(student, guided):.3f}, "
                      f"|d_c| = {rms(d_c):.3f} (the style's change of the conditional pass alone)")
            x = x + (sigmas[i + 1] - s) * (v_u_style + w * (v_c_style - v_u_style))


if __name__ == "__main__":
    main()
