"""Memory plan of a distillation run: bytes of weights, LoRA and optimizer states, heads and activations.

Everything is counted from the model config (no allocation), so the plan for FLUX.1-dev at 1024x1024 is
computed on any machine. Notation: B batch, L_img = (H/16)(W/16) image tokens, L_txt text tokens,
L = L_img + L_txt, C = heads * head_dim, h heads.

Parameters (exact, from the layer shapes of ``models/flux_layers.py``):
    double block: 36 C^2 + 30 C + 4 head_dim;  single block: 15 C^2 + 11 C + 2 head_dim.

Tensors saved for backward, per block (counted from the ops of ``flux_layers.py``; math attention):
    double: 28 B L C + B h L^2 (attention probabilities) + 6 B L r per LoRA'd stream pair
    single: 24 B L C + B h L^2 + 5 B L r
With a fused (flash) attention kernel on GPU the ``B h L^2`` term and the 3 transposed q/k/v copies are
replaced by the output ``B L C`` and the log-sum-exp ``B h L`` (fp32).
With gradient checkpointing each block keeps only its inputs (``B L C``) and one block's full set is
rebuilt at a time during backward.

Trainable state: LoRA / head parameters in fp32 with fp32 gradients and two AdamW moments = 16 bytes each.
"""
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterator, List, Sequence, Tuple

from ..models.lora import DEFAULT_TARGET_MODULES, matches_target

GIB = 1024 ** 3
TRAINABLE_BYTES_PER_PARAM = 16  # fp32 value + fp32 gradient + AdamW first and second moments

# Activation sets that hold a graph at the generator step's peak, and extra trainable adapters, per method.
METHOD_GRAPHS: Dict[str, dict] = {
    "pcm": dict(student_graphs=1, backbone_graphs=0, heads=False, fake_adapter=False),
    "pcm+adv": dict(student_graphs=1, backbone_graphs=1, heads=True, fake_adapter=False),
    "pcm+adv+dmd(student)": dict(student_graphs=1, backbone_graphs=1, heads=True, fake_adapter=False),
    "pcm+adv+dmd(adapter)": dict(student_graphs=1, backbone_graphs=1, heads=True, fake_adapter=True),
    "flux_lightning": dict(student_graphs=2, backbone_graphs=1, heads=True, fake_adapter=False),
    "dmd2": dict(student_graphs=1, backbone_graphs=1, heads=True, fake_adapter=True),
}


def flux_linear_shapes(config) -> Iterator[Tuple[str, int, int]]:
    """Every Linear of the FLUX transformer as ``(dotted name, in_features, out_features)``."""
    cfg = dict(config)
    inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    out_channels = cfg.get("out_channels") or cfg["in_channels"]
    yield "time_text_embed.timestep_embedder.linear_1", 256, inner
    yield "time_text_embed.timestep_embedder.linear_2", inner, inner
    if cfg.get("guidance_embeds", False):
        yield "time_text_embed.guidance_embedder.linear_1", 256, inner
        yield "time_text_embed.guidance_embedder.linear_2", inner, inner
    yield "time_text_embed.text_embedder.linear_1", cfg["pooled_projection_dim"], inner
    yield "time_text_embed.text_embedder.linear_2", inner, inner
    yield "context_embedder", cfg["joint_attention_dim"], inner
    yield "x_embedder", cfg["in_channels"], inner
    for i in range(cfg["num_layers"]):
        prefix = f"transformer_blocks.{i}"
        yield f"{prefix}.norm1.linear", inner, 6 * inner
        yield f"{prefix}.norm1_context.linear", inner, 6 * inner
        for name in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            yield f"{prefix}.attn.{name}", inner, inner
        for ff in ("ff", "ff_context"):
            yield f"{prefix}.{ff}.net.0.proj", inner, 4 * inner
            yield f"{prefix}.{ff}.net.2", 4 * inner, inner
    for i in range(cfg["num_single_layers"]):
        prefix = f"single_transformer_blocks.{i}"
        yield f"{prefix}.norm.linear", inner, 3 * inner
        yield f"{prefix}.proj_mlp", inner, 4 * inner
        yield f"{prefix}.proj_out", 5 * inner, inner
        for name in ("to_q", "to_k", "to_v"):
            yield f"{prefix}.attn.{name}", inner, inner
    yield "norm_out.linear", inner, 2 * inner
    yield "proj_out", inner, out_channels


def base_parameter_count(config) -> int:
    """Parameters of the transformer: Linear weights and biases plus the RMSNorm weights of q and k."""
    cfg = dict(config)
    linear = sum(n_in * n_out + n_out for _, n_in, n_out in flux_linear_shapes(cfg))
    norms = cfg["attention_head_dim"] * (4 * cfg["num_layers"] + 2 * cfg["num_single_layers"])
    return linear + norms


def lora_parameter_count(config, rank: int, target_modules: Sequence[str] = DEFAULT_TARGET_MODULES) -> int:
    """``sum rank * (in + out)`` over the Linears a LoRA with these targets wraps."""
    return sum(rank * (n_in + n_out) for name, n_in, n_out in flux_linear_shapes(config)
               if any(matches_target(name, pattern) for pattern in target_modules))


def head_parameter_count(config, hidden_channels: int = 256) -> int:
    """Discriminator heads (``models/discriminator.py``): 1x1 convs C->k, k->k, k->1 and two GroupNorms."""
    cfg = dict(config)
    inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    k = hidden_channels
    per_head = (inner * k + k) + (k * k + k) + (k + 1) + 4 * k
    return per_head * (cfg["num_layers"] + cfg["num_single_layers"])


def block_saved_elements(kind: str, batch: int, tokens: int, inner: int, heads: int, lora_rank: int,
                         fused_attention: bool) -> Tuple[int, int]:
    """Elements saved for backward by one block: ``(in the activation dtype, in fp32)``.

    ``tokens`` is ``L = L_img + L_txt``. See the module docstring for the coefficients.
    """
    per_token = 28 if kind == "double" else 24
    lora_linears = 6 if kind == "double" else 5
    act = per_token * batch * tokens * inner + lora_linears * batch * tokens * lora_rank
    fp32 = 0
    if fused_attention:
        act += (1 - 3) * batch * tokens * inner  # output kept, transposed q/k/v copies not made
        fp32 += batch * heads * tokens  # log-sum-exp
    else:
        fp32 += batch * heads * tokens * tokens  # softmax output (fp32 softmax)
    return act, fp32


@dataclass
class MemoryPlanSettings:
    """What the plan depends on (defaults: the reference FLUX-Lightning run, ALGORITHMS.md)."""

    height: int = 1024  # image height in pixels
    width: int = 1024  # image width in pixels
    batch_size: int = 1  # per device
    text_tokens: int = 512  # T5 sequence length (FLUX.1-dev: 512)
    lora_rank: int = 32  # student (and fake-score) LoRA rank
    weight_bytes: int = 2  # frozen base weights: bf16
    activation_bytes: int = 2  # activations under bf16 autocast
    gradient_checkpointing: bool = True  # per-block recompute
    fused_attention: bool = True  # flash attention kernel (GPU); False = math attention (CPU)
    head_hidden_channels: int = 256  # width of each discriminator head
    vae_scale_factor: int = 8  # pixels per latent cell (FLUX VAE)


@dataclass
class MemoryPlan:
    """Bytes per component and the peak of a generator step."""

    method: str
    components: Dict[str, int] = field(default_factory=dict)

    @property
    def peak_bytes(self) -> int:
        return sum(self.components.values())

    def as_dict(self) -> dict:
        return {"method": self.method, "components": dict(self.components), "peak_bytes": self.peak_bytes}


def activation_bytes_per_graph(config, settings: MemoryPlanSettings) -> Dict[str, int]:
    """Bytes one forward pass with a graph keeps, and the extra bytes while one block is recomputed."""
    cfg = dict(config)
    inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    heads = cfg["num_attention_heads"]
    patch = 2 * settings.vae_scale_factor
    image_tokens = (settings.height // patch) * (settings.width // patch)
    tokens = image_tokens + settings.text_tokens
    batch, act_b = settings.batch_size, settings.activation_bytes

    def full_block(kind):
        act, fp32 = block_saved_elements(kind, batch, tokens, inner, heads, settings.lora_rank,
                                         settings.fused_attention)
        return act * act_b + fp32 * 4

    full = {"double": full_block("double"), "single": full_block("single")}
    final_layers = 3 * batch * image_tokens * inner * act_b
    if settings.gradient_checkpointing:
        n_blocks = cfg["num_layers"] + cfg["num_single_layers"]
        kept = n_blocks * batch * tokens * inner * act_b + final_layers
        recompute = max(full.values())
    else:
        kept = cfg["num_layers"] * full["double"] + cfg["num_single_layers"] * full["single"] + final_layers
        recompute = 0
    return {"kept": kept, "recompute": recompute, "image_tokens": image_tokens}


def plan_memory(config, method: str, settings: MemoryPlanSettings = None) -> MemoryPlan:
    """The generator step's peak for ``method`` (a key of ``METHOD_GRAPHS``)."""
    if method not in METHOD_GRAPHS:
        raise ValueError(f"unknown method '{method}'; choose one of {sorted(METHOD_GRAPHS)}")
    settings = settings or MemoryPlanSettings()
    graphs = METHOD_GRAPHS[method]
    cfg = dict(config)
    inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    lora = lora_parameter_count(cfg, settings.lora_rank)
    acts = activation_bytes_per_graph(cfg, settings)
    graph_count = graphs["student_graphs"] + graphs["backbone_graphs"]

    plan = MemoryPlan(method)
    plan.components["base weights"] = base_parameter_count(cfg) * settings.weight_bytes
    plan.components["student LoRA + AdamW"] = lora * TRAINABLE_BYTES_PER_PARAM
    if graphs["fake_adapter"]:
        plan.components["fake-score LoRA + AdamW"] = lora * TRAINABLE_BYTES_PER_PARAM
    if graphs["heads"]:
        heads = head_parameter_count(cfg, settings.head_hidden_channels)
        plan.components["heads + AdamW"] = heads * TRAINABLE_BYTES_PER_PARAM
        n_blocks = cfg["num_layers"] + cfg["num_single_layers"]
        head_acts = n_blocks * 6 * settings.batch_size * acts["image_tokens"] * settings.head_hidden_channels
        plan.components["head activations"] = head_acts * 4
    plan.components["activations kept"] = graph_count * acts["kept"]
    plan.components["one block recomputed"] = acts["recompute"]
    # Gradients of the activations flowing through the block being back-propagated: four MLP-wide [B, L, 4C]
    # buffers (an estimate; scripts/memory_plan.py --check compares the total with the allocator's peak).
    tokens = acts["image_tokens"] + settings.text_tokens
    plan.components["backward working set"] = 4 * settings.batch_size * tokens * 4 * inner * settings.activation_bytes
    return plan


def plans_for_all_methods(config, settings: MemoryPlanSettings = None) -> List[MemoryPlan]:
    return [plan_memory(config, method, settings) for method in METHOD_GRAPHS]


def plans_markdown(plans: Sequence[MemoryPlan], settings: MemoryPlanSettings) -> str:
    """A markdown table: one row per method, one column per component (GiB)."""
    columns: List[str] = []
    for plan in plans:
        columns += [c for c in plan.components if c not in columns]
    lines = [f"Settings: {asdict(settings)}", "",
             "| method | " + " | ".join(columns) + " | peak (GiB) |",
             "|---|" + "---|" * (len(columns) + 1)]
    for plan in plans:
        cells = [f"{plan.components.get(c, 0) / GIB:.2f}" for c in columns]
        lines.append(f"| {plan.method} | " + " | ".join(cells) + f" | **{plan.peak_bytes / GIB:.2f}** |")
    return "\n".join(lines) + "\n"
