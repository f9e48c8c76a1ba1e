"""The trained 4-step PCM student is closer to the teacher's 50-step samples than the teacher's own 4 Euler steps
(scripts/benchmark_pcm_student.py at a smaller budget; the full run's figures are in its docstring's command)."""
import runpy
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "scripts" / "benchmark_pcm_student.py"


@pytest.mark.slow
def test_four_step_student_beats_four_teacher_euler_steps():
    run = runpy.run_path(str(SCRIPT), run_name="benchmark_pcm_student")["run"]
    result = run(teacher_steps=500, pcm_steps=250, dataset_size=2048)
    # before training the student is the teacher (LoRA B = 0): the same 4-step samples
    assert result["student_4_step_msd_before_training"] == pytest.approx(result["teacher_4_step_msd"], rel=1e-4)
    assert result["student_4_step_msd"] < 0.5 * result["teacher_4_step_msd"], result
