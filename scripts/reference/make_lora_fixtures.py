"""Build the LoRA interchange fixtures with the PyTorch reference (diffusers FluxTransformer2DModel + peft).

Run in the PyTorch reference environment, in this order:

    /work/venv-ref/bin/python scripts/reference/make_lora_fixtures.py reference   # (a) + (b) + kohya
    /work/venv/bin/python scripts/reference/make_ours_exported_lora.py           # Paddle: our adapter, exported
    /work/venv-ref/bin/python scripts/reference/make_lora_fixtures.py ours        # (c)

Writes ``tests/fixtures/lora/``:

- ``base/``: a tiny FLUX transformer (2 double + 2 single blocks) saved with ``save_pretrained``
  (``config.json`` + ``diffusion_pytorch_model.safetensors``, the diffusers / FLUX.1-dev layout).
- ``inputs.safetensors``: hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids,
  txt_ids, guidance.
- ``peft_adapter.safetensors``: a peft LoRA (r=4, lora_alpha=8, a rank_pattern and an alpha_pattern entry,
  random nonzero lora_B, some modules outside our default targets) saved by
  ``FluxPipeline.save_lora_weights`` with its adapter metadata, as diffusers' training scripts save it.
- ``kohya_adapter.safetensors``: a kohya/sd-scripts style LoRA with the original BFL FLUX names
  (fused ``img_attn_qkv`` / ``txt_attn_qkv``, single-block ``linear1``, ``final_layer_adaLN_modulation_1``,
  embedders), ``.alpha`` on some modules only.
- ``outputs.safetensors``: the transformer output with no adapter (``base``), with the peft adapter live
  (``peft``), and with the kohya LoRA (``kohya``). The kohya reference merges ``alpha/rank * up @ down`` into
  the fused BFL weights (assembled from the diffusers weights, scale/shift swapped for the final layer) and
  splits them back, so it checks the key and row mapping independently of any loader.
- mode ``ours``: loads ``ours_exported.safetensors`` and ``ours_exported_mixed.safetensors`` (written by our
  ``export_diffusers_lora``, see ``make_ours_exported_lora.py``) with ``FluxTransformer2DModel.load_lora_adapter``
  (and checks that the route of ``FluxPipeline.load_lora_weights`` gives the same output) and saves both outputs
  in ``ours_exported_output.safetensors``.
"""
import sys
from pathlib import Path

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import load_file, save_file

OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "lora"
CONFIG = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
              num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
              axes_dims_rope=[4, 4, 8])
BATCH, IMG_LEN, TXT_LEN = 2, 16, 8
# peft targets: most of our defaults plus modules outside them (modulation, embedder, final norm).
PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "to_add_out", "ff.net.2", "ff_context.net.0.proj",
                "proj_mlp", "single_transformer_blocks.1.proj_out", "norm1.linear", "x_embedder", "norm_out.linear"]
PEFT_RANK_PATTERN = {"proj_mlp": 2}
PEFT_ALPHA_PATTERN = {"x_embedder": 3.0}
# kohya module -> (rank, alpha or None for "no .alpha key"); BFL names.
KOHYA_MODULES = {
    "double_blocks_0_img_attn_qkv": (4, 8.0), "double_blocks_0_img_attn_proj": (4, 8.0),
    "double_blocks_0_img_mlp_0": (2, 1.0), "double_blocks_0_img_mlp_2": (4, None),
    "double_blocks_0_img_mod_lin": (4, 8.0), "double_blocks_1_txt_attn_qkv": (4, 2.0),
    "double_blocks_1_txt_attn_proj": (4, 8.0), "double_blocks_1_txt_mlp_0": (4, 8.0),
    "double_blocks_1_txt_mlp_2": (4, 8.0), "double_blocks_1_txt_mod_lin": (2, 4.0),
    "single_blocks_0_linear1": (4, 8.0), "single_blocks_0_linear2": (4, 8.0),
    "single_blocks_1_modulation_lin": (4, None), "single_blocks_1_linear1": (2, 3.0),
    "img_in": (4, 8.0), "txt_in": (4, 8.0), "time_in_in_layer": (4, 8.0), "time_in_out_layer": (4, 8.0),
    "vector_in_in_layer": (4, 8.0), "vector_in_out_layer": (4, 8.0), "guidance_in_in_layer": (4, 8.0),
    "guidance_in_out_layer": (4, 8.0), "final_layer_linear": (4, 8.0), "final_layer_adaLN_modulation_1": (4, 8.0),
}


def tiny_base():
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**CONFIG).eval()
    with torch.no_grad():  # make every parameter nonzero and O(0.1), so every path is exercised
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def make_inputs():
    g = torch.Generator().manual_seed(1)
    img_ids = torch.zeros(4, 4, 3)
    img_ids[..., 1] = torch.arange(4)[:, None]
    img_ids[..., 2] = torch.arange(4)[None, :]
    return {
        "hidden_states": torch.randn(BATCH, IMG_LEN, CONFIG["in_channels"], generator=g),
        "encoder_hidden_states": torch.randn(BATCH, TXT_LEN, CONFIG["joint_attention_dim"], generator=g),
        "pooled_projections": torch.randn(BATCH, CONFIG["pooled_projection_dim"], generator=g),
        "timestep": torch.tensor([0.3, 0.8]),
        "img_ids": img_ids.reshape(IMG_LEN, 3),
        "txt_ids": torch.zeros(TXT_LEN, 3),
        "guidance": torch.tensor([3.5, 2.0]),
    }


@torch.no_grad()
def run(model, inputs):
    return model(**inputs, return_dict=False)[0].contiguous()


def kohya_to_diffusers_targets(name):
    """BFL kohya module -> the diffusers modules whose output rows it fuses, in BFL row order."""
    parts = name.split("_")
    if name.startswith("double_blocks_"):
        i, rest = parts[2], "_".join(parts[3:])
        block = f"transformer_blocks.{i}"
        table = {
            "img_attn_qkv": [f"{block}.attn.to_q", f"{block}.attn.to_k", f"{block}.attn.to_v"],
            "txt_attn_qkv": [f"{block}.attn.add_q_proj", f"{block}.attn.add_k_proj", f"{block}.attn.add_v_proj"],
            "img_attn_proj": [f"{block}.attn.to_out.0"], "txt_attn_proj": [f"{block}.attn.to_add_out"],
            "img_mlp_0": [f"{block}.ff.net.0.proj"], "img_mlp_2": [f"{block}.ff.net.2"],
            "txt_mlp_0": [f"{block}.ff_context.net.0.proj"], "txt_mlp_2": [f"{block}.ff_context.net.2"],
            "img_mod_lin": [f"{block}.norm1.linear"], "txt_mod_lin": [f"{block}.norm1_context.linear"],
        }
        return table[rest]
    if name.startswith("single_blocks_"):
        i, rest = parts[2], "_".join(parts[3:])
        block = f"single_transformer_blocks.{i}"
        return {"linear1": [f"{block}.attn.to_q", f"{block}.attn.to_k", f"{block}.attn.to_v", f"{block}.proj_mlp"],
                "linear2": [f"{block}.proj_out"], "modulation_lin": [f"{block}.norm.linear"]}[rest]
    return {"img_in": ["x_embedder"], "txt_in": ["context_embedder"],
            "time_in_in_layer": ["time_text_embed.timestep_embedder.linear_1"],
            "time_in_out_layer": ["time_text_embed.timestep_embedder.linear_2"],
            "vector_in_in_layer": ["time_text_embed.text_embedder.linear_1"],
            "vector_in_out_layer": ["time_text_embed.text_embedder.linear_2"],
            "guidance_in_in_layer": ["time_text_embed.guidance_embedder.linear_1"],
            "guidance_in_out_layer": ["time_text_embed.guidance_embedder.linear_2"],
            "final_layer_linear": ["proj_out"], "final_layer_adaLN_modulation_1": ["norm_out.linear"]}[name]


def swap_halves(weight):
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


@torch.no_grad()
def make_kohya(model, inputs):
    """Random kohya LoRA with BFL names; reference output by merging into fused BFL weights."""
    g = torch.Generator().manual_seed(3)
    modules = dict(model.named_modules())
    tensors = {}
    for name, (rank, alpha) in KOHYA_MODULES.items():
        targets = kohya_to_diffusers_targets(name)
        # BFL fused weight [sum(out), in]: rows concatenated in BFL order.
        fused = torch.cat([modules[t].weight for t in targets], dim=0)
        if name == "final_layer_adaLN_modulation_1":  # diffusers norm_out.linear is [scale; shift], BFL [shift; scale]
            fused = swap_halves(fused)
        down = 0.1 * torch.randn(rank, fused.shape[1], generator=g)
        up = 0.1 * torch.randn(fused.shape[0], rank, generator=g)
        tensors[f"lora_unet_{name}.lora_down.weight"] = down
        tensors[f"lora_unet_{name}.lora_up.weight"] = up
        if alpha is not None:
            tensors[f"lora_unet_{name}.alpha"] = torch.tensor(alpha)
        merged = fused + ((alpha if alpha is not None else rank) / rank) * (up @ down)
        if name == "final_layer_adaLN_modulation_1":
            merged = swap_halves(merged)
        start = 0
        for t in targets:
            rows = modules[t].weight.shape[0]
            modules[t].weight.copy_(merged[start:start + rows])
            start += rows
    return tensors, run(model, inputs)


def make_reference():
    OUT.mkdir(parents=True, exist_ok=True)
    model = tiny_base()
    model.save_pretrained(OUT / "base", safe_serialization=True)
    inputs = make_inputs()
    save_file({k: v.contiguous() for k, v in inputs.items()}, str(OUT / "inputs.safetensors"))
    outputs = {"base": run(model, inputs)}

    config = LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_TARGETS, rank_pattern=PEFT_RANK_PATTERN,
                        alpha_pattern=PEFT_ALPHA_PATTERN, init_lora_weights=True)
    model.add_adapter(config, adapter_name="default")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=g))
    outputs["peft"] = run(model, inputs)
    FluxPipeline.save_lora_weights(
        OUT, transformer_lora_layers=get_peft_model_state_dict(model),
        transformer_lora_adapter_metadata=model.peft_config["default"].to_dict(),
        weight_name="peft_adapter.safetensors")

    base = FluxTransformer2DModel.from_pretrained(OUT / "base").eval()
    assert torch.equal(run(base, inputs), outputs["base"])
    kohya_tensors, outputs["kohya"] = make_kohya(base, inputs)
    save_file(kohya_tensors, str(OUT / "kohya_adapter.safetensors"))
    save_file(outputs, str(OUT / "outputs.safetensors"))
    for name, out in outputs.items():
        print(f"{name}: output {tuple(out.shape)}, max |out - base| = {(out - outputs['base']).abs().max():.4f}")


def make_ours():
    """(c) our exported adapters, loaded by diffusers' ``load_lora_adapter``."""
    inputs = load_file(str(OUT / "inputs.safetensors"))
    reference = load_file(str(OUT / "outputs.safetensors"))
    outputs = {}
    for name in ("ours_exported", "ours_exported_mixed"):
        model = FluxTransformer2DModel.from_pretrained(OUT / "base").eval()
        model.load_lora_adapter(str(OUT / f"{name}.safetensors"), prefix="transformer", adapter_name="ours")
        lora_modules = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and "ours" in m.lora_A]
        assert lora_modules, "no LoRA layer was injected"
        outputs[name] = run(model, inputs)
        # the route of FluxPipeline.load_lora_weights: lora_state_dict (alphas, metadata) + load_lora_into_transformer
        via_pipeline = FluxTransformer2DModel.from_pretrained(OUT / "base").eval()
        state_dict, alphas, metadata = FluxPipeline.lora_state_dict(
            str(OUT / f"{name}.safetensors"), return_alphas=True, return_lora_metadata=True)
        FluxPipeline.load_lora_into_transformer(state_dict, network_alphas=alphas, transformer=via_pipeline,
                                                adapter_name="ours", metadata=metadata)
        pipeline_diff = (run(via_pipeline, inputs) - outputs[name]).abs().max()
        assert pipeline_diff == 0, f"load_lora_weights route differs from load_lora_adapter by {pipeline_diff}"
        print(f"{name}: {len(lora_modules)} LoRA modules, "
              f"max |out - base| = {(outputs[name] - reference['base']).abs().max():.4f}, "
              f"load_lora_weights route identical")
    print(f"ours_exported_mixed vs kohya reference: max abs diff "
          f"{(outputs['ours_exported_mixed'] - reference['kohya']).abs().max():.3g}")
    save_file(outputs, str(OUT / "ours_exported_output.safetensors"))


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "reference"
    if mode == "reference":
        make_reference()
    elif mode == "ours":
        make_ours()
    else:
        sys.exit(f"unknown mode {mode!r}: use 'reference' or 'ours'")
