"""Build the LoRA interchange fixtures with the PyTorch reference (diffusers FluxTransformer2DModel + peft).

Run in the PyTorch reference environment, in this order:

    /work/venv-ref/bin/python scripts/reference/make_lora_fixtures.py reference   # (a) + (b) + kohya
    /work/venv/bin/python scripts/reference/make_ours_exported_lora.py           # Paddle: our adapter, exported
    /work/venv-ref/bin/python scripts/reference/make_lora_fixtures.py ours        # (c)
    /work/venv-ref/bin/python scripts/reference/make_lora_fixtures.py interop     # (d), after (a) + (b)

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
- mode ``interop`` (d), from the committed base, inputs, kohya and peft files:

  - ``comfyui_adapter.safetensors``: the kohya fixture's tensors under the names ComfyUI's LoRA save node writes
    (``diffusion_model.<BFL module>.lora_up.weight`` / ``.lora_down.weight``, ``.alpha``; the rank-4 block modules
    other than single-block ``linear1``, which diffusers' converter maps right for the tiny model) plus an
    all-zero ``.diff_b`` bias difference as that node writes by default;
  - ``kohya_diffusers_names_adapter.safetensors``: a kohya-style LoRA with diffusers module names
    (``lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight``, OneTrainer's naming) on the modules
    diffusers' converter of that naming handles, every module with its ``.alpha``;
  - ``interop_outputs.safetensors``: ``comfyui`` and ``kohya_diffusers_names`` (each file loaded by diffusers'
    own ``FluxPipeline.lora_state_dict`` + ``load_lora_into_transformer``, checked against merging
    ``alpha/rank * up @ down`` by hand) and ``kohya_merged_plus_peft`` (the kohya LoRA merged into the weights and
    the peft adapter live on top: two LoRAs at once).
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
        rows = sum(modules[t].weight.shape[0] for t in kohya_to_diffusers_targets(name))
        columns = modules[kohya_to_diffusers_targets(name)[0]].weight.shape[1]
        tensors[f"lora_unet_{name}.lora_down.weight"] = 0.1 * torch.randn(rank, columns, generator=g)
        tensors[f"lora_unet_{name}.lora_up.weight"] = 0.1 * torch.randn(rows, rank, generator=g)
        if alpha is not None:
            tensors[f"lora_unet_{name}.alpha"] = torch.tensor(alpha)
    merge_kohya(model, tensors)
    return tensors, run(model, inputs)


@torch.no_grad()
def merge_kohya(model, tensors):
    """Merge a kohya LoRA with BFL names into the diffusers weights: fused BFL weight + alpha/rank * up @ down."""
    modules = dict(model.named_modules())
    for name in (n for n in KOHYA_MODULES if f"lora_unet_{n}.lora_down.weight" in tensors):
        down, up = tensors[f"lora_unet_{name}.lora_down.weight"], tensors[f"lora_unet_{name}.lora_up.weight"]
        rank = down.shape[0]
        alpha = float(tensors.get(f"lora_unet_{name}.alpha", torch.tensor(float(rank))))
        targets = kohya_to_diffusers_targets(name)
        # BFL fused weight [sum(out), in]: rows concatenated in BFL order.
        fused = torch.cat([modules[t].weight for t in targets], dim=0)
        if name == "final_layer_adaLN_modulation_1":  # diffusers norm_out.linear is [scale; shift], BFL [shift; scale]
            fused = swap_halves(fused)
        merged = fused + (alpha / rank) * (up @ down)
        if name == "final_layer_adaLN_modulation_1":
            merged = swap_halves(merged)
        start = 0
        for t in targets:
            rows = modules[t].weight.shape[0]
            modules[t].weight.copy_(merged[start:start + rows])
            start += rows


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


# kohya BFL module name -> the dotted BFL name ComfyUI uses after "diffusion_model."
COMFYUI_NAMES = {
    "img_attn_qkv": "img_attn.qkv", "img_attn_proj": "img_attn.proj", "img_mlp_0": "img_mlp.0",
    "img_mlp_2": "img_mlp.2", "img_mod_lin": "img_mod.lin", "txt_attn_qkv": "txt_attn.qkv",
    "txt_attn_proj": "txt_attn.proj", "txt_mlp_0": "txt_mlp.0", "txt_mlp_2": "txt_mlp.2", "txt_mod_lin": "txt_mod.lin",
    "linear1": "linear1", "linear2": "linear2", "modulation_lin": "modulation.lin",
    "img_in": "img_in", "txt_in": "txt_in", "time_in_in_layer": "time_in.in_layer",
    "time_in_out_layer": "time_in.out_layer", "vector_in_in_layer": "vector_in.in_layer",
    "vector_in_out_layer": "vector_in.out_layer", "guidance_in_in_layer": "guidance_in.in_layer",
    "guidance_in_out_layer": "guidance_in.out_layer", "final_layer_linear": "final_layer.linear",
    "final_layer_adaLN_modulation_1": "final_layer.adaLN_modulation.1",
}
# diffusers modules (of the tiny model) in OneTrainer's kohya naming -> (rank, alpha); one rank, as diffusers'
# converter folds alpha / rank into the weights and then infers one alpha for the file from the ranks
DIFFUSERS_NAMED_MODULES = {
    "transformer_blocks.0.attn.to_q": (4, 8.0), "transformer_blocks.0.attn.to_v": (4, 1.0),
    "transformer_blocks.0.attn.to_out.0": (4, 2.0), "transformer_blocks.1.attn.add_k_proj": (4, 8.0),
    "transformer_blocks.1.attn.to_add_out": (4, 4.0), "single_transformer_blocks.0.attn.to_k": (4, 8.0),
    "single_transformer_blocks.1.attn.to_q": (4, 3.0), "context_embedder": (4, 8.0), "x_embedder": (4, 2.0),
    "norm_out.linear": (4, 8.0), "proj_out": (4, 8.0), "time_text_embed.timestep_embedder.linear_1": (4, 8.0),
    "time_text_embed.guidance_embedder.linear_2": (4, 8.0),
}


def comfyui_name(kohya_name):
    for block in ("double_blocks", "single_blocks"):
        if kohya_name.startswith(block + "_"):
            index, rest = kohya_name[len(block) + 1:].split("_", 1)
            return f"{block}.{index}.{COMFYUI_NAMES[rest]}"
    return COMFYUI_NAMES[kohya_name]


def load_with_diffusers(path, inputs):
    """Output of a fresh base with ``path`` (no adapter metadata) loaded through diffusers' FluxPipeline route."""
    model = FluxTransformer2DModel.from_pretrained(OUT / "base").eval()
    state_dict, alphas = FluxPipeline.lora_state_dict(str(path), return_alphas=True)
    FluxPipeline.load_lora_into_transformer(state_dict, network_alphas=alphas, transformer=model, adapter_name="x")
    assert [n for n, m in model.named_modules() if hasattr(m, "lora_A") and "x" in m.lora_A], "no LoRA injected"
    return run(model, inputs)


@torch.no_grad()
def make_interop():
    """(d) ComfyUI names, kohya names with diffusers modules, and two LoRAs live at once."""
    inputs = load_file(str(OUT / "inputs.safetensors"))
    reference = load_file(str(OUT / "outputs.safetensors"))
    kohya = load_file(str(OUT / "kohya_adapter.safetensors"))
    outputs = {}

    # Only block modules of rank 4 other than the single blocks' linear1: for the tiny model, diffusers' converter
    # maps those right (each checked alone against the merge by hand). It splits linear1 with FLUX.1-dev's sizes,
    # infers one alpha for a file of mixed ranks, and its embedder / final-layer route does not reproduce the
    # merge (no alphas, the final adaLN's lora_down rows swapped with lora_up's), so those are left out here; the
    # tests check them through the kohya reference, whose names map one to one.
    comfy_source = {k: v for k, v in kohya.items() if "_blocks_" in k and "_linear1." not in k
                    and KOHYA_MODULES[k[len("lora_unet_"):].partition(".")[0]][0] == 4}
    comfy = {}
    for key, value in comfy_source.items():
        stem, _, part = key[len("lora_unet_"):].partition(".")
        comfy[f"diffusion_model.{comfyui_name(stem)}.{part}"] = value
    comfy["diffusion_model.double_blocks.0.img_attn.qkv.diff_b"] = torch.zeros(3 * 32)
    save_file(comfy, str(OUT / "comfyui_adapter.safetensors"))
    outputs["comfyui"] = load_with_diffusers(OUT / "comfyui_adapter.safetensors", inputs)
    by_hand = FluxTransformer2DModel.from_pretrained(OUT / "base").eval()
    merge_kohya(by_hand, comfy_source)
    by_hand = run(by_hand, inputs)
    print(f"comfyui (diffusers loader) vs merged by hand: max abs diff "
          f"{(outputs['comfyui'] - by_hand).abs().max():.3g}, vs base {(by_hand - reference['base']).abs().max():.3g}")
    assert torch.allclose(outputs["comfyui"], by_hand, atol=1e-5)

    g = torch.Generator().manual_seed(4)
    merged = FluxTransformer2DModel.from_pretrained(OUT / "base").eval()
    modules = dict(merged.named_modules())
    named = {}
    for module, (rank, alpha) in DIFFUSERS_NAMED_MODULES.items():
        out_features, in_features = modules[module].weight.shape
        down = 0.1 * torch.randn(rank, in_features, generator=g)
        up = 0.1 * torch.randn(out_features, rank, generator=g)
        stem = "lora_transformer_" + module.replace(".", "_")
        named.update({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
                      f"{stem}.alpha": torch.tensor(alpha)})
        modules[module].weight.add_((alpha / rank) * (up @ down))
    save_file(named, str(OUT / "kohya_diffusers_names_adapter.safetensors"))
    outputs["kohya_diffusers_names"] = load_with_diffusers(OUT / "kohya_diffusers_names_adapter.safetensors", inputs)
    by_hand = run(merged, inputs)
    print(f"kohya with diffusers names (diffusers loader) vs merged by hand: max abs diff "
          f"{(outputs['kohya_diffusers_names'] - by_hand).abs().max():.3g}, "
          f"vs base {(by_hand - reference['base']).abs().max():.3g}")
    assert torch.allclose(outputs["kohya_diffusers_names"], by_hand, atol=1e-5)

    both = FluxTransformer2DModel.from_pretrained(OUT / "base").eval()
    merge_kohya(both, kohya)
    state_dict, alphas, metadata = FluxPipeline.lora_state_dict(
        str(OUT / "peft_adapter.safetensors"), return_alphas=True, return_lora_metadata=True)
    FluxPipeline.load_lora_into_transformer(state_dict, network_alphas=alphas, transformer=both, adapter_name="peft",
                                            metadata=metadata)  # with the metadata's rank / alpha patterns
    outputs["kohya_merged_plus_peft"] = run(both, inputs)
    print(f"kohya merged + peft live: max |out - base| = "
          f"{(outputs['kohya_merged_plus_peft'] - reference['base']).abs().max():.3g}")
    save_file(outputs, str(OUT / "interop_outputs.safetensors"))


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "reference"
    if mode == "reference":
        make_reference()
    elif mode == "ours":
        make_ours()
    elif mode == "interop":
        make_interop()
    else:
        sys.exit(f"unknown mode {mode!r}: use 'reference', 'ours' or 'interop'")
