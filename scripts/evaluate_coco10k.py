"""COCO-10k evaluation in one command: prompts -> teacher reference (cached) -> student -> FID-FLUX, CLIP score,
optional FID vs real images -> results.json + results.md with the protocol.

    python scripts/evaluate_coco10k.py --pretrained_model_name_or_path ./FLUX.1-dev \
        --path_to_lora ./flux_lightning_lora.safetensors --captions_file ./captions_val2014.json \
        --inception_weights ./pt_inception-2015-12-05.safetensors --clip_model_path ./clip-vit-large-patch14 \
        --output_dir ./eval_coco10k

Rerunning the same command skips every finished step. See ``python scripts/evaluate_coco10k.py --help``.
"""
from ppdiffusers_fast.command_line import quiet_third_party, run_command

quiet_third_party()  # before paddle is imported; --verbose keeps the third-party warnings
from ppdiffusers_fast.evaluation.coco_cli import main  # noqa: E402

if __name__ == "__main__":
    run_command(main)
