"""Print the memory plan of a FLUX distillation run per method, and check it against measurements.

    python scripts/memory_plan.py                          # FLUX.1-dev, 1024x1024, batch 1, rank 32, bf16, checkpointing
    python scripts/memory_plan.py --height 768 --width 1360 --lora_rank 64 --no_gradient_checkpointing
    python scripts/memory_plan.py --check                  # two small configs on this CPU: plan vs allocator peak
    python scripts/memory_plan.py --output_markdown plan.md
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

from ppdiffusers_fast.training.memory_plan import MemoryPlanSettings, plans_for_all_methods, plans_markdown

FLUX1_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                 axes_dims_rope=[16, 56, 56])
CHECK_CONFIGS = {
    "small-a": (dict(FLUX1_DEV, num_layers=2, num_single_layers=4, attention_head_dim=32, num_attention_heads=4,
                     joint_attention_dim=64, pooled_projection_dim=32, in_channels=16, axes_dims_rope=[8, 12, 12]), 16),
    "small-b": (dict(FLUX1_DEV, num_layers=3, num_single_layers=6, attention_head_dim=32, num_attention_heads=6,
                     joint_attention_dim=64, pooled_projection_dim=32, in_channels=16, guidance_embeds=False,
                     axes_dims_rope=[8, 12, 12]), 24),
}
CHECK_BATCH, CHECK_TEXT_TOKENS, CHECK_RANK = 2, 32, 8


def check_settings(grid, checkpointing):
    return MemoryPlanSettings(height=16 * grid, width=16 * grid, batch_size=CHECK_BATCH, text_tokens=CHECK_TEXT_TOKENS,
                              lora_rank=CHECK_RANK, weight_bytes=4, activation_bytes=4,
                              gradient_checkpointing=checkpointing, fused_attention=False)


def measure_in_subprocess(name, checkpointing):
    """One fresh process per measurement, so allocator peaks do not mix."""
    code = (
        "import json, sys; sys.path.insert(0, %r); import memory_plan as m; "
        "from ppdiffusers_fast.training.memory_measure import peak_allocated_increase, saved_activation_elements; "
        "cfg, grid = m.CHECK_CONFIGS[%r]; ckpt = %r; "
        "out = peak_allocated_increase(cfg, m.CHECK_BATCH, grid, m.CHECK_TEXT_TOKENS, m.CHECK_RANK, ckpt); "
        "out['saved_elements'] = None if ckpt else saved_activation_elements(cfg, m.CHECK_BATCH, grid, "
        "m.CHECK_TEXT_TOKENS, m.CHECK_RANK); print('RESULT' + json.dumps(out))"
    ) % (str(Path(__file__).parent), name, checkpointing)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def run_check():
    from ppdiffusers_fast.training.memory_plan import activation_bytes_per_graph, lora_parameter_count, plan_memory

    rows = ["| config | checkpointing | saved activations: plan / measured (MiB) | step peak above weights: "
            "plan / measured (MiB) | ratio |", "|---|---|---|---|---|"]
    for name, (config, grid) in CHECK_CONFIGS.items():
        for checkpointing in (False, True):
            settings = check_settings(grid, checkpointing)
            plan = plan_memory(config, "pcm", settings)
            # Before the step the allocator already holds the weights and the LoRA parameters themselves.
            planned = plan.peak_bytes - plan.components["base weights"] - 4 * lora_parameter_count(config, CHECK_RANK)
            measured = measure_in_subprocess(name, checkpointing)
            saved = "-"
            if measured["saved_elements"] is not None:
                kept = activation_bytes_per_graph(config, settings)["kept"]
                saved = f"{kept / 2**20:.1f} / {4 * measured['saved_elements'] / 2**20:.1f}"
            rows.append(f"| {name} (grid {grid}x{grid}, batch {CHECK_BATCH}) | {checkpointing} | {saved} | "
                        f"{planned / 2**20:.1f} / {measured['peak_increase'] / 2**20:.1f} | "
                        f"{planned / measured['peak_increase']:.2f} |")
    return "\n".join(rows) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--text_tokens", type=int, default=512)
    parser.add_argument("--lora_rank", type=int, default=32)
    parser.add_argument("--no_gradient_checkpointing", action="store_true")
    parser.add_argument("--math_attention", action="store_true", help="plan for the explicit-softmax attention")
    parser.add_argument("--config", type=str, default=None, help="a transformer config.json (default: FLUX.1-dev)")
    parser.add_argument("--check", action="store_true", help="also measure two small configs on this machine")
    parser.add_argument("--output_markdown", type=str, default=None)
    args = parser.parse_args()

    config = json.loads(Path(args.config).read_text()) if args.config else FLUX1_DEV
    settings = MemoryPlanSettings(height=args.height, width=args.width, batch_size=args.batch_size,
                                  text_tokens=args.text_tokens, lora_rank=args.lora_rank,
                                  gradient_checkpointing=not args.no_gradient_checkpointing,
                                  fused_attention=not args.math_attention)
    report = "## Memory plan (GiB)\n\n" + plans_markdown(plans_for_all_methods(config, settings), settings)
    if args.check:
        report += "\n## Plan vs measured (CPU, fp32, math attention, Paddle allocator peak)\n\n" + run_check()
    print(report)
    if args.output_markdown:
        Path(args.output_markdown).write_text(report)


if __name__ == "__main__":
    main()
