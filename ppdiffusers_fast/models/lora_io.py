"""LoRA files: our own format (exact round trip) and interchange with diffusers / PEFT / kohya FLUX LoRAs.

Our format (:func:`save_lora` / :func:`load_lora`): safetensors with ``<module>.lora_A [in, rank]`` and
``<module>.lora_B [rank, out]`` in Paddle layout, exactly as held by the model, and string metadata
``lora_format="ppdiffusers_fast"``, ``rank``, ``alpha``, ``dropout``, ``target_modules`` (JSON list of module names),
``rank_pattern`` / ``alpha_pattern`` (JSON ``{module: value}`` for modules that differ) and ``sampling`` (JSON dict of
the few-step sampling settings: num_inference_steps, multiphase, num_euler_timesteps, guidance_scale, lora_scale,
and, for a student that re-noises its x0 predictions between steps, sampler = "renoise").

diffusers layout (:func:`export_diffusers_lora`): ``transformer.<module>.lora_A.weight [rank, in]`` and
``transformer.<module>.lora_B.weight [out, rank]`` (PyTorch orientation). diffusers has no alpha key for FLUX
LoRAs (it takes alpha = rank), so ``alpha / rank`` is folded into ``lora_B``, and an adapter with mixed ranks is
zero-padded to one rank (diffusers infers a single alpha from the ranks).

Import (:func:`import_lora`) detects the style from the keys:

- diffusers / PEFT: ``[base_model.model.][transformer.]<module>.lora_A.weight`` / ``.lora_B.weight`` and optional
  ``<module>.alpha``. Alpha comes from the ``.alpha`` key, else from the ``lora_adapter_metadata`` (or an
  ``adapter_config.json`` beside the file: ``lora_alpha``, ``alpha_pattern``, ``use_rslora``), else alpha = rank.
- kohya / sd-scripts with the original BFL FLUX names: ``lora_unet_<name>.lora_down.weight [rank, in]``,
  ``.lora_up.weight [out, rank]``, optional ``.alpha`` (default rank). Mapping (``N`` = block index):

  ===========================================  ==========================================================
  ``double_blocks_N_img_attn_qkv``             ``transformer_blocks.N.attn.to_q / to_k / to_v`` (fused)
  ``double_blocks_N_txt_attn_qkv``             ``transformer_blocks.N.attn.add_q_proj / add_k_proj / add_v_proj``
  ``double_blocks_N_img_attn_proj``            ``transformer_blocks.N.attn.to_out.0``
  ``double_blocks_N_txt_attn_proj``            ``transformer_blocks.N.attn.to_add_out``
  ``double_blocks_N_img_mlp_0`` / ``_2``       ``transformer_blocks.N.ff.net.0.proj`` / ``ff.net.2``
  ``double_blocks_N_txt_mlp_0`` / ``_2``       ``transformer_blocks.N.ff_context.net.0.proj`` / ``ff_context.net.2``
  ``double_blocks_N_img_mod_lin`` / ``txt_``   ``transformer_blocks.N.norm1.linear`` / ``norm1_context.linear``
  ``single_blocks_N_linear1``                  ``single_transformer_blocks.N.attn.to_q / to_k / to_v``, ``.proj_mlp``
  ``single_blocks_N_linear2``                  ``single_transformer_blocks.N.proj_out``
  ``single_blocks_N_modulation_lin``           ``single_transformer_blocks.N.norm.linear``
  ``img_in`` / ``txt_in``                      ``x_embedder`` / ``context_embedder``
  ``time_in_in_layer`` / ``_out_layer``        ``time_text_embed.timestep_embedder.linear_1`` / ``linear_2``
  ``vector_in_in_layer`` / ``_out_layer``      ``time_text_embed.text_embedder.linear_1`` / ``linear_2``
  ``guidance_in_in_layer`` / ``_out_layer``    ``time_text_embed.guidance_embedder.linear_1`` / ``linear_2``
  ``final_layer_linear``                       ``proj_out``
  ``final_layer_adaLN_modulation_1``           ``norm_out.linear`` (BFL rows [shift; scale], ours [scale; shift])
  ===========================================  ==========================================================

  A fused projection's ``lora_up`` rows are split across its targets (sizes read from the model) and every target
  gets the same ``lora_down``: ``up @ down`` restricted to each target's rows is exactly the fused update.
- kohya-named files with diffusers module names (OneTrainer, sd-scripts on the diffusers model):
  ``lora_transformer_<name>`` or ``lora_unet_<name>``, where ``<name>`` is a diffusers module name with "." written
  as "_" (``lora_transformer_transformer_blocks_0_attn_to_q``); resolved against the model's own Linear names.
- ComfyUI (its LoRA save node, and the names its loader reads for FLUX): ``diffusion_model.<BFL module>`` with
  ``.lora_up.weight`` / ``.lora_down.weight`` (or ``.lora_B.weight`` / ``.lora_A.weight``) and optional ``.alpha``,
  e.g. ``diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight``: the BFL table above with "." for "_".
  ComfyUI's full differences ``.diff`` / ``.diff_b`` (norm weights, biases) are not low-rank updates: all-zero
  ones add nothing and are skipped, any other value is an error naming the key.

Sampling settings: only our files carry them (``sampling`` metadata). :func:`read_lora_file` reads a file once
(tensors, metadata, style, sampling), :func:`install_lora_file` puts it into a model; :func:`import_lora` does
both. :func:`combine_sampling` picks the settings of several files (at most one set of settings may be given).

Every key must be used: unknown keys, wrong shapes, rank mismatches between A and B, and partial pairs raise a
``ValueError`` naming the keys, before the model is touched.
"""
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import paddle
import paddle.nn as nn

from .finite import describe_non_finite, non_finite_names
from .lora import LoraAdapter, adapter_modules, adapter_names, check_adapter_name, freeze_base, wrap_linear
from .safetensors_io import open_file, read_header, save_file

FORMAT = "ppdiffusers_fast"
SAMPLING_KEYS = ("num_inference_steps", "multiphase", "num_euler_timesteps", "guidance_scale", "lora_scale", "sampler")
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"


@dataclass
class LoraUpdate:
    """One module's update in Paddle layout: ``lora_A [in, rank]``, ``lora_B [rank, out]``, scaled by alpha/rank."""

    module: str
    lora_A: paddle.Tensor
    lora_B: paddle.Tensor
    alpha: float
    keys: str  # the file keys it came from, for error messages


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------


def _resolve_file(path) -> Path:
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            names = [f.name for f in files]
            raise ValueError(f"expected exactly one .safetensors file in folder {path}, found {names}")
        path = files[0]
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    return path


def read_safetensors(path) -> Tuple[Dict[str, paddle.Tensor], Dict[str, str], Path]:
    """``(tensors, metadata, file)`` of a safetensors file (or of the single one in a folder)."""
    path = _resolve_file(path)
    with open_file(path) as handle:  # checks the header; errors name the file and the key
        metadata = dict(handle.metadata() or {})
        tensors = {key: handle.get_tensor(key).clone() for key in handle.keys()}
    bad = non_finite_names(tensors)
    if bad:
        raise ValueError(f"LoRA file {path} holds NaN or infinite values in {describe_non_finite(bad)}; "
                         f"it cannot be used")
    return tensors, metadata, path


def _atomic_save(tensors: Dict[str, paddle.Tensor], metadata: Dict[str, str], path) -> None:
    bad = non_finite_names(tensors)
    if bad:
        raise ValueError(f"refusing to write {path}: the LoRA holds NaN or infinite values in "
                         f"{describe_non_finite(bad)}")
    save_file(tensors, path, metadata=metadata)


def _raise_if(problems: List[str], path, what: str) -> None:
    if problems:
        shown = "\n  - ".join(problems[:40]) + ("" if len(problems) <= 40 else f"\n  ... {len(problems) - 40} more")
        raise ValueError(f"{what} {path}:\n  - {shown}")


# ----------------------------------------------------------------------------------------------------------------
# Installing updates into a model
# ----------------------------------------------------------------------------------------------------------------


def check_updates(model: nn.Layer, updates: List[LoraUpdate]) -> List[str]:
    """Every problem at once: unknown module, not a Linear, A/B rank mismatch, shapes that do not fit."""
    layers = dict(model.named_sublayers())
    problems, seen = [], {}
    for u in updates:
        layer = layers.get(u.module)
        if u.module in seen:
            problems.append(f"{u.keys}: module '{u.module}' is also set by {seen[u.module]}")
        seen[u.module] = u.keys
        if layer is None:
            problems.append(f"{u.keys}: unknown key, the model has no module '{u.module}'")
            continue
        if not isinstance(layer, nn.Linear):
            problems.append(f"{u.keys}: module '{u.module}' is {type(layer).__name__}, not a Linear")
            continue
        a_shape, b_shape = list(u.lora_A.shape), list(u.lora_B.shape)
        if len(a_shape) != 2 or len(b_shape) != 2:
            problems.append(f"{u.keys}: LoRA weights must be 2-D")
            continue
        if a_shape[1] != b_shape[0]:
            problems.append(f"{u.keys}: rank mismatch between A (rank {a_shape[1]}) and B (rank {b_shape[0]})")
            continue
        in_features, out_features = layer.weight.shape
        if a_shape[0] != in_features or b_shape[1] != out_features:
            problems.append(f"{u.keys}: wrong shape, the LoRA maps {a_shape[0]} -> {b_shape[1]} features (rank "
                            f"{a_shape[1]}) but module '{u.module}' is a Linear {in_features} -> {out_features}")
    return problems


@paddle.no_grad()
def install_updates(model: nn.Layer, adapter_name: str, updates: List[LoraUpdate], path, dropout: float = 0.0):
    """Create adapter ``adapter_name`` from checked updates (or overwrite it when it holds exactly these modules)."""
    check_adapter_name(adapter_name)
    if not updates:
        raise ValueError(f"LoRA file {path} holds no LoRA weights")
    _raise_if(check_updates(model, updates), path, "LoRA does not fit the model, file")
    existing = adapter_modules(model, adapter_name) if adapter_name in adapter_names(model) else None
    if existing is not None:
        expected = {u.module: u.lora_A.shape[1] for u in updates}
        actual = {m: a.rank for m, a in existing.items()}
        if expected != actual:
            raise ValueError(f"adapter '{adapter_name}' already exists with other modules or ranks than {path}")
    for u in updates:
        layer = wrap_linear(model, u.module)
        adapter = layer.lora_adapters[adapter_name] if existing is not None else layer.add_adapter(
            adapter_name, u.lora_A.shape[1], u.alpha, dropout)
        adapter.alpha = float(u.alpha)
        adapter.lora_A.set_value(u.lora_A.astype(adapter.lora_A.dtype))
        adapter.lora_B.set_value(u.lora_B.astype(adapter.lora_B.dtype))
    freeze_base(model)


def _most_common_and_pattern(values: Dict[str, float]):
    common = Counter(values.values()).most_common(1)[0][0]
    return common, {m: v for m, v in values.items() if v != common}


# ----------------------------------------------------------------------------------------------------------------
# Our format
# ----------------------------------------------------------------------------------------------------------------


def _check_sampling(sampling: Optional[dict]) -> dict:
    sampling = dict(sampling or {})
    unknown = sorted(set(sampling) - set(SAMPLING_KEYS))
    if unknown:
        raise ValueError(f"unknown sampling setting(s) {unknown}; allowed: {list(SAMPLING_KEYS)}")
    json.dumps(sampling)  # must be JSON-serialisable
    return sampling


def save_lora(model: nn.Layer, adapter_name: str, path, sampling: Optional[dict] = None) -> None:
    """Write adapter ``adapter_name`` in our format (atomic). ``sampling``: dict with keys from ``SAMPLING_KEYS``."""
    sampling = _check_sampling(sampling)
    modules: Dict[str, LoraAdapter] = adapter_modules(model, adapter_name)
    tensors = {}
    for name, adapter in modules.items():
        tensors[f"{name}.lora_A"] = adapter.lora_A
        tensors[f"{name}.lora_B"] = adapter.lora_B
    rank, rank_pattern = _most_common_and_pattern({m: a.rank for m, a in modules.items()})
    alpha, alpha_pattern = _most_common_and_pattern({m: a.alpha for m, a in modules.items()})
    dropouts = {a.dropout.p if a.dropout is not None else 0.0 for a in modules.values()}
    metadata = {
        "lora_format": FORMAT, "lora_format_version": "1", "layout": "lora_A [in, rank], lora_B [rank, out]",
        "rank": str(rank), "alpha": repr(float(alpha)), "dropout": repr(float(max(dropouts))),
        "target_modules": json.dumps(list(modules)), "rank_pattern": json.dumps(rank_pattern),
        "alpha_pattern": json.dumps(alpha_pattern), "sampling": json.dumps(sampling),
    }
    _atomic_save(tensors, metadata, path)


def load_lora(model: nn.Layer, path, adapter_name: str) -> dict:
    """Load a file written by :func:`save_lora` as adapter ``adapter_name`` (exact values).

    Returns the metadata: ``rank``, ``alpha``, ``dropout``, ``target_modules``, ``rank_pattern``,
    ``alpha_pattern``, ``sampling`` (dict).
    """
    tensors, metadata, path = read_safetensors(path)
    if metadata.get("lora_format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} LoRA file (metadata 'lora_format' is "
                         f"{metadata.get('lora_format')!r}); use import_lora for diffusers / PEFT / kohya / "
                         f"ComfyUI files")
    info = _our_metadata(metadata, path)
    updates, problems = _our_updates(tensors, info)
    _raise_if(problems + check_updates(model, updates), path, "bad LoRA file")
    install_updates(model, adapter_name, updates, path, dropout=info["dropout"])
    return info


def _our_metadata(metadata: Dict[str, str], path) -> dict:
    try:
        return {
            "rank": int(metadata["rank"]), "alpha": float(metadata["alpha"]), "dropout": float(metadata["dropout"]),
            "target_modules": json.loads(metadata["target_modules"]),
            "rank_pattern": json.loads(metadata["rank_pattern"]),
            "alpha_pattern": json.loads(metadata["alpha_pattern"]), "sampling": json.loads(metadata["sampling"]),
        }
    except (KeyError, ValueError) as error:
        raise ValueError(f"{path}: missing or malformed metadata entry {error}") from error


def _our_updates(tensors: Dict[str, paddle.Tensor], info: dict):
    problems, pairs = [], {}
    for key in tensors:
        module, _, part = key.rpartition(".")
        if part not in ("lora_A", "lora_B") or not module:
            problems.append(f"{key}: unknown key (expected '<module>.lora_A' or '<module>.lora_B')")
            continue
        pairs.setdefault(module, {})[part] = key
    updates = []
    for module, parts in pairs.items():
        if len(parts) != 2:
            have, missing = next(iter(parts.values())), "lora_B" if "lora_A" in parts else "lora_A"
            problems.append(f"{have}: partial LoRA pair, '{module}.{missing}' is missing")
            continue
        lora_a = tensors[parts["lora_A"]]
        rank = info["rank_pattern"].get(module, info["rank"])
        if lora_a.ndim == 2 and lora_a.shape[1] != rank:
            problems.append(f"{parts['lora_A']}: rank {lora_a.shape[1]} but metadata says {rank}")
        alpha = info["alpha_pattern"].get(module, info["alpha"])
        updates.append(LoraUpdate(module, lora_a, tensors[parts["lora_B"]], alpha,
                                  f"{parts['lora_A']} / {parts['lora_B']}"))
    if sorted(pairs) != sorted(info["target_modules"]):
        missing = sorted(set(info["target_modules"]) - set(pairs))
        extra = sorted(set(pairs) - set(info["target_modules"]))
        problems.append(f"target_modules metadata does not match the weights: no weights for {missing}, "
                        f"weights not listed {extra}")
    return updates, problems


# ----------------------------------------------------------------------------------------------------------------
# diffusers export
# ----------------------------------------------------------------------------------------------------------------


def export_diffusers_lora(model: nn.Layer, adapter_name: str, path, prefix: str = "transformer") -> None:
    """Write ``<prefix>.<module>.lora_A.weight [rank, in]`` / ``lora_B.weight [out, rank]`` with alpha/rank in B.

    Loaders without an alpha (diffusers' ``load_lora_adapter`` / ``load_lora_weights``, ComfyUI) then apply the
    update at scale 1. diffusers infers one ``lora_alpha`` from the ranks, which is right only when all ranks are
    equal, so a smaller rank is zero-padded to the largest (extra A rows and B columns of zeros add nothing).
    The run-time scale (:func:`set_adapter_scale`) is not part of the file.
    """
    modules = adapter_modules(model, adapter_name)
    rank = max(a.rank for a in modules.values())
    tensors = {}
    for name, adapter in modules.items():
        lora_a = adapter.lora_A.astype("float32").t()  # [r, in]
        lora_b = (adapter.lora_B.astype("float32") * adapter.scaling).t()  # [out, r]
        if adapter.rank < rank:
            lora_a = paddle.concat([lora_a, paddle.zeros([rank - adapter.rank, lora_a.shape[1]])], axis=0)
            lora_b = paddle.concat([lora_b, paddle.zeros([lora_b.shape[0], rank - adapter.rank])], axis=1)
        tensors[f"{prefix}.{name}.lora_A.weight"] = lora_a.astype(adapter.lora_A.dtype)
        tensors[f"{prefix}.{name}.lora_B.weight"] = lora_b.astype(adapter.lora_B.dtype)
    metadata = {"format": "pt", "lora_source": FORMAT, "alpha": "folded into lora_B (alpha / rank)"}
    _atomic_save(tensors, metadata, path)


# ----------------------------------------------------------------------------------------------------------------
# Import: diffusers / PEFT
# ----------------------------------------------------------------------------------------------------------------


def _peft_config_from(metadata: Dict[str, str], path: Path) -> dict:
    """The PEFT LoraConfig dict stored with the file (diffusers metadata or adapter_config.json), or {}."""
    if DIFFUSERS_METADATA_KEY in metadata:
        raw = json.loads(metadata[DIFFUSERS_METADATA_KEY])
        config = {k[len("transformer."):]: v for k, v in raw.items() if k.startswith("transformer.")}
        return config or raw
    beside = path.with_name("adapter_config.json")
    return json.loads(beside.read_text()) if beside.is_file() else {}


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: the first pattern p with ``re.match(rf"(.*\\.)?({p})$", module)``."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _peft_updates(tensors: Dict[str, paddle.Tensor], metadata: Dict[str, str], path: Path):
    config = _peft_config_from(metadata, path)
    problems = []
    if config.get("use_dora"):
        problems.append("DoRA adapters (use_dora) are not supported")
    pairs: Dict[str, Dict[str, str]] = {}
    for key in tensors:
        name = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
        name = name[len("transformer."):] if name.startswith("transformer.") else name
        match = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|alpha)", name)
        if match is None or name.startswith(("text_encoder", "lora_te")):
            problems.append(f"{key}: unknown key (expected '<module>.lora_A.weight', '.lora_B.weight' or '.alpha'"
                            " of the transformer)")
            continue
        pairs.setdefault(match.group(1), {})[match.group(2)] = key
    updates = []
    for module, parts in pairs.items():
        if "lora_A.weight" not in parts or "lora_B.weight" not in parts:
            have = ", ".join(parts.values())
            missing = [p for p in ("lora_A.weight", "lora_B.weight") if p not in parts]
            problems.append(f"{have}: partial LoRA, missing {missing} for module '{module}'")
            continue
        a, b = tensors[parts["lora_A.weight"]], tensors[parts["lora_B.weight"]]  # [rank, in], [out, rank]
        if a.ndim != 2 or b.ndim != 2:
            problems.append(f"{parts['lora_A.weight']}: LoRA weights must be 2-D, got {list(a.shape)}, {list(b.shape)}")
            continue
        rank = a.shape[0]
        expected_rank = _pattern_value(config.get("rank_pattern"), module, config.get("r", rank))
        if expected_rank != rank:
            problems.append(f"{parts['lora_A.weight']}: rank {rank} but the adapter config says {expected_rank}")
        if "alpha" in parts:
            alpha = tensors[parts["alpha"]].astype("float32").item()
        else:
            alpha = float(_pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", rank)))
            if config.get("use_rslora"):  # PEFT scales by alpha / sqrt(rank)
                alpha = alpha * math.sqrt(rank)
        updates.append(LoraUpdate(module, a.t(), b.t(), alpha, " / ".join(parts.values())))
    return updates, problems


# ----------------------------------------------------------------------------------------------------------------
# Import: kohya with BFL names
# ----------------------------------------------------------------------------------------------------------------

_KOHYA_DOUBLE = {
    "img_attn_qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn_qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "img_attn_proj": ["attn.to_out.0"], "txt_attn_proj": ["attn.to_add_out"],
    "img_mlp_0": ["ff.net.0.proj"], "img_mlp_2": ["ff.net.2"],
    "txt_mlp_0": ["ff_context.net.0.proj"], "txt_mlp_2": ["ff_context.net.2"],
    "img_mod_lin": ["norm1.linear"], "txt_mod_lin": ["norm1_context.linear"],
}
_KOHYA_SINGLE = {"linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], "linear2": ["proj_out"],
                 "modulation_lin": ["norm.linear"]}
_KOHYA_TOP = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer_linear": "proj_out", "final_layer_adaLN_modulation_1": "norm_out.linear",
}
_SWAP_HALVES = {"final_layer_adaLN_modulation_1"}  # BFL [shift; scale] -> diffusers [scale; shift]


def kohya_targets(name: str) -> Optional[List[str]]:
    """Our module names for a kohya BFL module name (without ``lora_unet_``), in fused row order; None if unknown."""
    match = re.fullmatch(r"double_blocks_(\d+)_(\w+)", name)
    if match and match.group(2) in _KOHYA_DOUBLE:
        return [f"transformer_blocks.{match.group(1)}.{t}" for t in _KOHYA_DOUBLE[match.group(2)]]
    match = re.fullmatch(r"single_blocks_(\d+)_(\w+)", name)
    if match and match.group(2) in _KOHYA_SINGLE:
        return [f"single_transformer_blocks.{match.group(1)}.{t}" for t in _KOHYA_SINGLE[match.group(2)]]
    return [_KOHYA_TOP[name]] if name in _KOHYA_TOP else None


# A key of a low-rank file written with kohya / ComfyUI names: prefix, module name, part.
_KOHYA_KEY = re.compile(r"(lora_unet_|lora_transformer_)(\w+)\.(lora_down\.weight|lora_up\.weight|alpha|diff|diff_b)")
_COMFYUI_KEY = re.compile(r"diffusion_model\.([\w.]+?)\.(lora_down\.weight|lora_up\.weight|lora_A\.weight"
                          r"|lora_B\.weight|alpha|diff|diff_b)")
_DOWN_UP = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
_FULL_DIFFERENCES = ("diff", "diff_b")


def _underscore_linear_names(model: nn.Layer) -> Dict[str, Optional[str]]:
    """``{dotted name with "." -> "_": dotted name}`` of the model's Linears (None where two names collide)."""
    names: Dict[str, Optional[str]] = {}
    for name, layer in model.named_sublayers():
        if isinstance(layer, nn.Linear):
            flat = name.replace(".", "_")
            names[flat] = None if flat in names else name
    return names


def _low_rank_groups(tensors: Dict[str, paddle.Tensor], model: nn.Layer, style: str):
    """``({key stem: {part: key}}, {key stem: target modules}, problems)`` of a kohya or ComfyUI file.

    Parts are ``lora_down.weight``, ``lora_up.weight``, ``alpha``. Targets are BFL names (``kohya_targets``) or,
    for kohya keys, the model's diffusers name spelt with "_". All-zero ComfyUI ``.diff`` / ``.diff_b`` tensors are
    skipped (they change nothing); other full differences are problems.
    """
    underscore_names = _underscore_linear_names(model) if style == "kohya" else {}
    problems, groups, targets = [], {}, {}
    for key in tensors:
        if style == "comfyui":
            match = _COMFYUI_KEY.fullmatch(key)
            stem, part = (f"diffusion_model.{match.group(1)}", match.group(2)) if match else (None, None)
            found = kohya_targets(match.group(1).replace(".", "_")) if match else None
            expected = "'diffusion_model.<BFL FLUX module>.lora_up.weight' / '.lora_down.weight' / '.alpha'"
        else:
            match = _KOHYA_KEY.fullmatch(key)
            stem, part = (match.group(1) + match.group(2), match.group(3)) if match else (None, None)
            found = None
            if match and match.group(1) == "lora_unet_":
                found = kohya_targets(match.group(2))
            if match and found is None and underscore_names.get(match.group(2)):
                found = [underscore_names[match.group(2)]]
            expected = ("'lora_unet_<BFL FLUX module>' or 'lora_transformer_<diffusers module with _>' "
                        "+ '.lora_down.weight' / '.lora_up.weight' / '.alpha'")
        if match is None or found is None:
            problems.append(f"{key}: unknown key, no module of the model has this name (expected {expected})")
            continue
        part = _DOWN_UP.get(part, part)
        if part in _FULL_DIFFERENCES:
            if bool((tensors[key] != 0).any()):
                problems.append(f"{key}: a full weight difference ('.{part}'), not a low-rank update; "
                                f"only LoRA weights are supported")
            continue
        if part in groups.get(stem, {}):
            problems.append(f"{key}: '{stem}' has two '{part}' entries ({groups[stem][part]})")
            continue
        groups.setdefault(stem, {})[part] = key
        targets[stem] = found
    return groups, targets, problems


def _kohya_updates(tensors: Dict[str, paddle.Tensor], model: nn.Layer, style: str = "kohya"):
    """Updates of a kohya (BFL or diffusers names) or ComfyUI file; fused BFL projections split by rows."""
    layers = dict(model.named_sublayers())
    groups, module_targets, problems = _low_rank_groups(tensors, model, style)
    updates = []
    for stem, parts in groups.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            missing = [p for p in ("lora_down.weight", "lora_up.weight") if p not in parts]
            problems.append(f"{', '.join(parts.values())}: partial LoRA, missing {missing} for '{stem}'")
            continue
        down, up = tensors[parts["lora_down.weight"]], tensors[parts["lora_up.weight"]]  # [rank, in], [out, rank]
        keys = f"{parts['lora_down.weight']} / {parts['lora_up.weight']}"
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            problems.append(f"{keys}: rank mismatch or not 2-D: lora_down {list(down.shape)}, lora_up {list(up.shape)}")
            continue
        rank = down.shape[0]
        alpha = tensors[parts["alpha"]].astype("float32").item() if "alpha" in parts else float(rank)
        targets = module_targets[stem]
        missing = [t for t in targets if not isinstance(layers.get(t), nn.Linear)]
        if missing:
            problems.append(f"{keys}: unknown key, the model has no Linear {missing}")
            continue
        sizes = [layers[t].weight.shape[1] for t in targets]
        if up.shape[0] != sum(sizes):
            problems.append(f"{keys}: wrong shape, lora_up has {up.shape[0]} rows but {targets} have {sum(sizes)}")
            continue
        if stem.replace(".", "_").endswith(tuple(_SWAP_HALVES)):  # a BFL name: rows [shift; scale]
            half = up.shape[0] // 2
            up = paddle.concat([up[half:], up[:half]], axis=0)
        for target, rows in zip(targets, paddle.split(up, sizes, axis=0)):
            updates.append(LoraUpdate(target, down.t(), rows.t(), alpha, keys))
    return updates, problems


# ----------------------------------------------------------------------------------------------------------------
# Import entry point
# ----------------------------------------------------------------------------------------------------------------

STYLES = ("ours", "peft", "kohya", "comfyui")


def detect_lora_style(keys: List[str], metadata: Dict[str, str]) -> str:
    """``"ours"``, ``"comfyui"``, ``"kohya"`` or ``"peft"`` (diffusers / PEFT) from a file's keys and metadata."""
    if metadata.get("lora_format") == FORMAT:
        return "ours"
    if any(k.startswith("diffusion_model.") for k in keys):
        return "comfyui"
    kohya = any(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in keys)
    peft = any(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    if kohya and peft:
        raise ValueError("the file mixes kohya (lora_down/lora_up) and PEFT (lora_A/lora_B) keys")
    if not (kohya or peft):
        raise ValueError(f"no LoRA weights recognised (first keys: {sorted(keys)[:5]})")
    return "kohya" if kohya else "peft"


@dataclass
class LoraFile:
    """A LoRA file read once: its tensors (file layout), metadata, detected style and sampling settings."""

    path: Path
    tensors: Dict[str, paddle.Tensor]
    metadata: Dict[str, str]
    style: str  # one of STYLES
    sampling: dict  # our files' few-step sampling settings ({} for every other style)


def read_lora_file(path) -> LoraFile:
    """Read and classify a LoRA file (or the single ``.safetensors`` in a folder); the model is not touched."""
    tensors, metadata, path = read_safetensors(path)
    try:
        style = detect_lora_style(list(tensors), metadata)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
    sampling = _our_metadata(metadata, path)["sampling"] if style == "ours" else {}
    return LoraFile(path, tensors, metadata, style, dict(sampling or {}))


def sampling_settings(path) -> Tuple[Path, dict]:
    """``(file, sampling settings)`` from the header only (no tensor is read): for checks before loading a model."""
    path = _resolve_file(path)
    _, metadata, _ = read_header(path)  # checked; errors name the file and the key
    if metadata.get("lora_format") != FORMAT:
        return path, {}
    return path, dict(_our_metadata(metadata, path)["sampling"] or {})


def check_lora_values(path) -> Path:
    """Read every tensor of a LoRA file and check it is finite (for checks before loading a model)."""
    return read_safetensors(path)[2]


def combine_sampling(files: List[Tuple[Path, dict]]) -> Tuple[dict, Optional[Path]]:
    """The sampling settings of several LoRA files used together, and the file they come from.

    Settings come from the one file whose metadata carries them (the few-step student). Files carrying the same
    settings (apart from their own ``lora_scale``) agree; different settings are an error naming both files.
    """
    chosen, source = {}, None
    for path, sampling in files:
        if not sampling:
            continue
        if source is None:
            chosen, source = dict(sampling), path
            continue
        differ = sorted(k for k in set(chosen) | set(sampling)
                        if k != "lora_scale" and chosen.get(k) != sampling.get(k))
        if differ:
            shown = ", ".join(f"{k}: {chosen.get(k)!r} vs {sampling.get(k)!r}" for k in differ)
            raise ValueError(f"LoRA files {source} and {path} both carry sampling settings and they differ "
                             f"({shown}); use one few-step LoRA per generation")
    return chosen, source


def install_lora_file(model: nn.Layer, lora: LoraFile, adapter_name: str, dropout: float = 0.0) -> dict:
    """Put a :class:`LoraFile` into ``model`` as adapter ``adapter_name``; see :func:`import_lora` for the result.

    Raises before touching the model when any key is unknown (naming the module the model lacks), partial,
    mis-shaped or of mismatched rank.
    """
    if lora.style == "ours":
        info = _our_metadata(lora.metadata, lora.path)
        updates, problems = _our_updates(lora.tensors, info)
        dropout = info["dropout"]
    elif lora.style == "peft":
        updates, problems = _peft_updates(lora.tensors, lora.metadata, lora.path)
    else:
        updates, problems = _kohya_updates(lora.tensors, model, lora.style)
    _raise_if(problems + check_updates(model, updates), lora.path, "bad LoRA file")
    install_updates(model, adapter_name, updates, lora.path, dropout=dropout)
    modules = adapter_modules(model, adapter_name)
    return {"style": lora.style, "file": lora.path, "sampling": dict(lora.sampling), "modules": list(modules),
            "ranks": {m: a.rank for m, a in modules.items()}, "alphas": {m: a.alpha for m, a in modules.items()}}


def import_lora(model: nn.Layer, path, adapter_name: str, dropout: float = 0.0) -> dict:
    """Load a LoRA in any supported style (ours, diffusers / PEFT, kohya, ComfyUI) as adapter ``adapter_name``.

    Reads the file once. Returns ``{"style", "file", "sampling", "modules", "ranks", "alphas"}`` (``sampling``:
    our files' few-step settings, else ``{}``; ranks and alphas per module). Raises before touching the model when
    any key is unknown, partial, mis-shaped or of mismatched rank.
    """
    return install_lora_file(model, read_lora_file(path), adapter_name, dropout)


__all__ = ["check_lora_values", "save_lora", "load_lora", "export_diffusers_lora", "import_lora", "detect_lora_style",
           "kohya_targets", "read_safetensors", "check_updates", "install_updates", "LoraUpdate", "SAMPLING_KEYS", "STYLES",
           "LoraFile", "read_lora_file", "install_lora_file", "sampling_settings", "combine_sampling"]
