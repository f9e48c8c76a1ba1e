"""Named LoRA adapters on one frozen base model.

A targeted ``paddle.nn.Linear`` (weight ``W [in, out]``, Paddle layout) becomes a :class:`LoraLinear` that keeps
the same ``weight``/``bias`` parameters (so base state-dict names do not change) and holds any number of named
adapters. For input ``x [..., in]`` (LoRA, Hu et al. 2021, eq. 3, with the alpha/rank scaling of its section 4.1):

    y = x W + b + sum over live, unmerged adapters a of  scale_a * (alpha_a / rank_a) * dropout(x) A_a B_a

with ``A_a [in, rank_a]`` (kaiming-uniform, the default of ``nn.Linear``) and ``B_a [rank_a, out]`` (zeros), so a
fresh adapter leaves the output unchanged. ``scale_a`` is the run-time scale (:func:`set_adapter_scale`, default 1).

Which adapters are live is chosen explicitly for the whole model (:func:`use_adapters`); nothing is live by default,
which is the base (teacher) model. Adapters that are not live take no part in the forward pass, so only the live
adapters' parameters receive gradients. The model's LoRA layers are found once and cached on the model (found again
after any Linear is wrapped, e.g. by :func:`inject_lora`), so switching costs O(number of LoRA layers). Typical use::

    inject_lora(transformer, LoraConfig(rank=32, alpha=32), "student")
    inject_lora(transformer, LoraConfig(rank=32, alpha=32), "fake_score")
    with use_adapters(transformer, "student"):
        x0 = transformer(...)                  # student
    with use_adapters(transformer):
        teacher_out = transformer(...)         # frozen base
"""
import contextlib
import math
import re
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Tuple

import paddle
import paddle.nn as nn

from .ops import linear

# Double blocks: attention of both streams and both MLPs; single blocks: attention q/k/v, proj_mlp and proj_out.
# A pattern matches a sub-layer whose dotted name ends with the pattern's parts; "*" matches any one part.
DEFAULT_TARGET_MODULES: Tuple[str, ...] = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    "single_transformer_blocks.*.proj_mlp", "single_transformer_blocks.*.proj_out",
)

# The reference FLUX-Lightning run's list (the training entry point's default): attention of both streams and
# the double blocks' MLPs; single blocks get LoRA on q/k/v only.
REFERENCE_TARGET_MODULES: Tuple[str, ...] = DEFAULT_TARGET_MODULES[:12]

# Attention only, the target set many field style LoRAs train: q/k/v/out of both streams in the double blocks,
# q/k/v in the single blocks (whose attention output goes through proj_out together with the MLP).
ATTENTION_TARGET_MODULES: Tuple[str, ...] = DEFAULT_TARGET_MODULES[:8]

# Where the timestep reaches every block: the adaLN modulation linears (shift/scale/gate from the time-text
# embedding) and the output projection. A few-step student must act differently from the teacher at the same
# noise level (jump to a phase edge instead of predicting the velocity), which these layers express directly.
MODULATION_TARGET_MODULES: Tuple[str, ...] = (
    "norm1.linear", "norm1_context.linear", "single_transformer_blocks.*.norm.linear", "norm_out.linear", "proj_out",
)

TARGET_MODULE_PRESETS: Dict[str, Tuple[str, ...]] = {
    "reference": REFERENCE_TARGET_MODULES,
    "attention": ATTENTION_TARGET_MODULES,
    "extended": DEFAULT_TARGET_MODULES + MODULATION_TARGET_MODULES,
}


def resolve_target_modules(spec: str) -> Tuple[str, ...]:
    """Target patterns from a preset name or a comma-separated list of patterns.

    Presets: ``reference`` (:data:`REFERENCE_TARGET_MODULES`), ``attention`` (:data:`ATTENTION_TARGET_MODULES`),
    ``extended`` (:data:`DEFAULT_TARGET_MODULES` plus
    :data:`MODULATION_TARGET_MODULES`: every Linear of the blocks, the adaLN modulations and the output projection).
    """
    if spec.strip() in TARGET_MODULE_PRESETS:
        return TARGET_MODULE_PRESETS[spec.strip()]
    targets = tuple(t.strip() for t in spec.split(",") if t.strip())
    if not targets:
        raise ValueError(f"LoRA target modules {spec!r}: give a preset ({', '.join(TARGET_MODULE_PRESETS)}) "
                         f"or comma-separated module-name suffixes")
    return targets


_ADAPTER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class LoraConfig:
    """How to inject one adapter (the training run's defaults are its ``--lora_rank`` / ``--lora_alpha`` flags)."""

    rank: int  # r: inner dimension of the low-rank update
    alpha: float  # the update is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapter's input (training mode only)
    target_modules: Tuple[str, ...] = field(default_factory=lambda: DEFAULT_TARGET_MODULES)  # name-suffix patterns

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoraConfig.rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoraConfig.alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, str) or not self.target_modules:
            raise ValueError(f"LoraConfig.target_modules must be a non-empty list, got {self.target_modules!r}")
        self.target_modules = tuple(self.target_modules)


def matches_target(module_name: str, pattern: str) -> bool:
    """True when the dotted ``module_name`` ends with ``pattern``'s parts ("*" matches any one part)."""
    name_parts, pattern_parts = module_name.split("."), pattern.split(".")
    if len(pattern_parts) > len(name_parts):
        return False
    tail = name_parts[len(name_parts) - len(pattern_parts):]
    return all(p == "*" or p == n for p, n in zip(pattern_parts, tail))


class LoraAdapter(nn.Layer):
    """One low-rank update of a Linear ``[in, out]``: ``scale * (alpha / rank) * dropout(x) A B``.

    Parameters: ``lora_A [in, rank]`` and ``lora_B [rank, out]`` (Paddle layout, the transpose of PEFT's).
    ``scale`` is the run-time multiplier; ``merged_scale`` is the scale folded into the base weight, or None.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float, dtype):
        super().__init__()
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.scale = 1.0
        self.merged_scale = None
        bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform(a=sqrt(5)) on a fan-in of `in_features`
        self.lora_A = self.create_parameter(
            [in_features, self.rank], dtype=dtype, default_initializer=nn.initializer.Uniform(-bound, bound))
        self.lora_B = self.create_parameter(
            [self.rank, out_features], dtype=dtype, default_initializer=nn.initializer.Constant(0.0))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def delta_weight(self, scale: float) -> paddle.Tensor:
        """``scale * (alpha / rank) * A B`` as ``[in, out]`` float32."""
        a, b = self.lora_A.astype("float32"), self.lora_B.astype("float32")
        return paddle.matmul(a, b) * (scale * self.scaling)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        """``x [..., in] -> [..., out]``."""
        h = self.dropout(x) if self.dropout is not None else x
        if h.dtype != self.lora_A.dtype:
            h = h.astype(self.lora_A.dtype)
        update = paddle.matmul(paddle.matmul(h, self.lora_A), self.lora_B)
        factor = self.scale * self.scaling
        return update if factor == 1.0 else update * factor  # no pass over [..., out] for a factor of exactly 1


class LoraLinear(nn.Linear):
    """A Linear that shares the wrapped layer's ``weight``/``bias`` and adds the live adapters' updates.

    Still an ``nn.Linear`` (same parameter names and layout), so code that handles Linear layers keeps working.
    """

    def __init__(self, base: nn.Linear):
        nn.Layer.__init__(self)  # reuse base's parameters instead of creating new ones
        self._dtype = base._dtype
        self._weight_attr, self._bias_attr = base._weight_attr, base._bias_attr
        self.name = base.name
        self.weight = base.weight
        self.bias = base.bias
        self.training = base.training
        self.lora_adapters = nn.LayerDict()
        self.live_adapters: Tuple[str, ...] = ()

    @property
    def in_features(self) -> int:
        return self.weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.weight.shape[1]

    def add_adapter(self, name: str, rank: int, alpha: float, dropout: float = 0.0) -> LoraAdapter:
        if name in self.lora_adapters:
            raise ValueError(f"adapter '{name}' already exists on this layer")
        adapter = LoraAdapter(self.in_features, self.out_features, rank, alpha, dropout, self.weight.dtype)
        if not self.training:
            adapter.eval()
        self.lora_adapters[name] = adapter
        return adapter

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        """``x [..., in] -> x W + b + sum of live, unmerged adapters' updates [..., out]``."""
        out = linear(x, self.weight, self.bias)
        for name in self.live_adapters:
            if name in self.lora_adapters:
                adapter = self.lora_adapters[name]
                if adapter.merged_scale is None:
                    out = out + adapter(x).astype(out.dtype)
        return out

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}(r={a.rank}, alpha={a.alpha:g})" for n, a in self.lora_adapters.items())
        return f"{super().extra_repr()}, adapters=[{adapters}]"


# ----------------------------------------------------------------------------------------------------------------
# Model-level operations
# ----------------------------------------------------------------------------------------------------------------


# Bumped each time a Linear is wrapped into a LoraLinear: a model's cached layer list older than this is stale.
_wrap_generation = 0
_CACHE_ATTRIBUTE = "_lora_layer_cache"


def lora_layers(model: nn.Layer) -> List[Tuple[str, LoraLinear]]:
    """``(dotted name, layer)`` of every :class:`LoraLinear` in ``model`` (``model`` itself included, named "").

    The walk over all sub-layers runs once; the result is cached on ``model`` and rebuilt after any
    :func:`wrap_linear` (which :func:`inject_lora` and the LoRA file loaders call). Code that restructures a
    model in another way (replacing sub-layers that hold LoRA layers) calls :func:`forget_lora_layers`.
    """
    cached = model.__dict__.get(_CACHE_ATTRIBUTE)
    if cached is None or cached[0] != _wrap_generation:
        named = model.named_sublayers(include_self=True)
        cached = (_wrap_generation, [(name, layer) for name, layer in named if isinstance(layer, LoraLinear)])
        object.__setattr__(model, _CACHE_ATTRIBUTE, cached)  # a plain attribute: no parameter, buffer or sub-layer
    return list(cached[1])


def forget_lora_layers() -> None:
    """Invalidate every model's cached list of LoRA layers (after restructuring a model by hand)."""
    global _wrap_generation
    _wrap_generation += 1


def _adapters_present(layers: List[Tuple[str, LoraLinear]]) -> set:
    return {name for _, layer in layers for name in layer.lora_adapters.keys()}


def adapter_names(model: nn.Layer) -> List[str]:
    """Sorted names of all adapters present anywhere in ``model``."""
    return sorted(_adapters_present(lora_layers(model)))


def layers_with_adapter(model: nn.Layer, adapter_name: str) -> List[Tuple[str, LoraLinear]]:
    """The LoRA layers that hold ``adapter_name``; raises when there are none."""
    found = [(n, layer) for n, layer in lora_layers(model) if adapter_name in layer.lora_adapters]
    if not found:
        raise KeyError(f"no adapter named '{adapter_name}' in the model; adapters present: {adapter_names(model)}")
    return found


def _get_sublayer(model: nn.Layer, dotted_name: str) -> nn.Layer:
    layer = model
    for part in dotted_name.split("."):
        children = dict(layer.named_children())
        if part not in children:
            raise KeyError(f"the model has no sub-layer '{dotted_name}' (missing part '{part}')")
        layer = children[part]
    return layer


def wrap_linear(model: nn.Layer, module_name: str) -> LoraLinear:
    """Replace the Linear at ``module_name`` by a :class:`LoraLinear` (once) and return it."""
    layer = _get_sublayer(model, module_name)
    if isinstance(layer, LoraLinear):
        return layer
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"sub-layer '{module_name}' is {type(layer).__name__}, not paddle.nn.Linear")
    parent_name, _, child_name = module_name.rpartition(".")
    parent = _get_sublayer(model, parent_name) if parent_name else model
    wrapped = LoraLinear(layer)
    wrapped.live_adapters = live_adapters(model)
    setattr(parent, child_name, wrapped)
    forget_lora_layers()
    return wrapped


def check_adapter_name(adapter_name: str) -> None:
    if not isinstance(adapter_name, str) or not _ADAPTER_NAME.match(adapter_name):
        raise ValueError(f"adapter name must be an identifier (letters, digits, '_'), got {adapter_name!r}")


def freeze_base(model: nn.Layer) -> None:
    """Set ``stop_gradient=True`` on every parameter that is not an adapter's."""
    adapter_ids = {id(p) for _, layer in lora_layers(model) for p in layer.lora_adapters.parameters()}
    for param in model.parameters():
        if id(param) not in adapter_ids:
            param.stop_gradient = True


def inject_lora(model: nn.Layer, config: LoraConfig, adapter_name: str) -> List[str]:
    """Add adapter ``adapter_name`` to every Linear whose name matches ``config.target_modules``; freeze the base.

    Raises when a target pattern matches no Linear, or when the adapter name is taken. Returns the module names.
    """
    check_adapter_name(adapter_name)
    if adapter_name in adapter_names(model):
        raise ValueError(f"adapter '{adapter_name}' already exists in the model")
    linear_names = [n for n, layer in model.named_sublayers() if isinstance(layer, nn.Linear)]
    targets: List[str] = []
    for pattern in config.target_modules:
        matched = [n for n in linear_names if matches_target(n, pattern)]
        if not matched:
            raise ValueError(f"target module pattern '{pattern}' matches no paddle.nn.Linear sub-layer of the model")
        targets.extend(n for n in matched if n not in targets)
    for module_name in targets:
        wrap_linear(model, module_name).add_adapter(adapter_name, config.rank, config.alpha, config.dropout)
    freeze_base(model)
    return targets


def inject_trainable_lora(model: nn.Layer, config: LoraConfig, adapter_name: str) -> List[paddle.Tensor]:
    """:func:`inject_lora` for an adapter that trains: its parameters get ``stop_gradient=False``; returns them."""
    inject_lora(model, config, adapter_name)
    params = adapter_parameters(model, adapter_name)
    for param in params:
        param.stop_gradient = False
    return params


def live_adapters(model: nn.Layer) -> Tuple[str, ...]:
    """The adapters currently chosen as live that ``model`` (or a sub-layer passed as model) holds; ``()`` = base."""
    layers = lora_layers(model)
    if not layers:
        return ()
    present = _adapters_present(layers)
    return tuple(name for name in layers[0][1].live_adapters if name in present)


def set_live_adapters(model: nn.Layer, *adapter_names_: str) -> None:
    """Make exactly these adapters live for the following forward passes (no names: base model only)."""
    names = tuple(dict.fromkeys(adapter_names_))
    layers = lora_layers(model)
    present = _adapters_present(layers)
    unknown = [n for n in names if n not in present]
    if unknown:
        raise KeyError(f"unknown adapter(s) {unknown}; adapters present: {sorted(present)}")
    for _, layer in layers:
        layer.live_adapters = names


@contextlib.contextmanager
def use_adapters(model: nn.Layer, *adapter_names_: str) -> Iterator[None]:
    """Within the block exactly ``adapter_names_`` are live (none: the frozen base); restores the previous choice.

    Gradients reach the adapters live when the forward ran. With gradient checkpointing, blocks re-run their
    forward during ``backward()``, so call ``backward()`` inside the same block (outside it, the re-run forward
    differs and Paddle fails). A graph compiled with ``paddle.jit.to_static`` keeps the adapters that were live
    when it was traced: merge the adapter before compiling for inference.
    """
    previous = {id(layer): layer.live_adapters for _, layer in lora_layers(model)}
    set_live_adapters(model, *adapter_names_)
    try:
        yield
    finally:
        for _, layer in lora_layers(model):
            layer.live_adapters = previous.get(id(layer), ())


def adapter_parameters(model: nn.Layer, adapter_name: str) -> List[paddle.Tensor]:
    """All ``lora_A``/``lora_B`` parameters of one adapter (for its optimizer)."""
    params = []
    for _, layer in layers_with_adapter(model, adapter_name):
        adapter = layer.lora_adapters[adapter_name]
        params.extend([adapter.lora_A, adapter.lora_B])
    return params


def set_adapter_scale(model: nn.Layer, adapter_name: str, scale: float) -> None:
    """Run-time multiplier of the adapter's update (not folded into any weight)."""
    for _, layer in layers_with_adapter(model, adapter_name):
        layer.lora_adapters[adapter_name].scale = float(scale)


@paddle.no_grad()
def merge_adapter(model: nn.Layer, adapter_name: str, scale: float = 1.0) -> None:
    """Fold ``scale * (alpha / rank) * A B`` into the base weights: ``W <- W + delta``.

    While merged, the adapter is part of the base: the forward skips it even when live.
    """
    merge_adapters(model, {adapter_name: scale})


@paddle.no_grad()
def merge_adapters(model: nn.Layer, scales: Dict[str, float]) -> None:
    """Fold several adapters at once: ``W <- W + sum_a scale_a * (alpha_a / rank_a) * A_a B_a`` per layer.

    The deltas ``[in, out]`` are summed in float32 and added to each weight once (one rounding for bfloat16
    weights), so the merged model equals the adapters live together at the same scales. Raises, before changing
    any weight, when an adapter is unknown or already merged.
    """
    for adapter_name in scales:
        _layers_merged(model, adapter_name, merged=False)
    for _, layer in lora_layers(model):
        held = [name for name in scales if name in layer.lora_adapters]
        if not held:
            continue
        delta = layer.lora_adapters[held[0]].delta_weight(scales[held[0]])
        for name in held[1:]:
            delta = delta + layer.lora_adapters[name].delta_weight(scales[name])
        _add_to_weight(layer, delta)
        for name in held:
            layer.lora_adapters[name].merged_scale = float(scales[name])


@paddle.no_grad()
def unmerge_adapter(model: nn.Layer, adapter_name: str) -> None:
    """Subtract what :func:`merge_adapter` added.

    Exact up to float rounding: about 1e-7 relative for float32 weights, but one bf16 step (about 4e-3 relative)
    for bfloat16 weights, so merge into bfloat16 weights only for inference.
    """
    for layer in _layers_merged(model, adapter_name, merged=True):
        adapter = layer.lora_adapters[adapter_name]
        _add_to_weight(layer, -adapter.delta_weight(adapter.merged_scale))
        adapter.merged_scale = None


def _layers_merged(model: nn.Layer, adapter_name: str, merged: bool) -> List[LoraLinear]:
    """The layers holding ``adapter_name``; raises unless the adapter is merged in all (``merged``) or in none."""
    layers = layers_with_adapter(model, adapter_name)
    wrong = [n for n, layer in layers if (layer.lora_adapters[adapter_name].merged_scale is not None) != merged]
    if wrong:
        state = "is not merged" if merged else "is already merged"
        raise RuntimeError(f"adapter '{adapter_name}' {state} (e.g. in '{wrong[0]}')")
    return [layer for _, layer in layers]


def _add_to_weight(layer: LoraLinear, delta: paddle.Tensor) -> None:
    """``W <- W + delta`` computed in float32 (``delta [in, out]`` float32), stored in the weight's dtype."""
    layer.weight.set_value((layer.weight.astype("float32") + delta).astype(layer.weight.dtype))


@contextlib.contextmanager
def record_live_adapters(model: nn.Layer) -> Iterator[List[Tuple[str, ...]]]:
    """Yield a list that receives the tuple of live adapter names at each top-level ``model(...)`` call."""
    record: List[Tuple[str, ...]] = []
    handle = model.register_forward_pre_hook(lambda layer, inputs: record.append(live_adapters(model)))
    try:
        yield record
    finally:
        handle.remove()


def adapter_modules(model: nn.Layer, adapter_name: str) -> Dict[str, LoraAdapter]:
    """``{module name: LoraAdapter}`` of one adapter, in model order."""
    return {n: layer.lora_adapters[adapter_name] for n, layer in layers_with_adapter(model, adapter_name)}


__all__ = [
    "DEFAULT_TARGET_MODULES", "REFERENCE_TARGET_MODULES", "ATTENTION_TARGET_MODULES", "MODULATION_TARGET_MODULES",
    "TARGET_MODULE_PRESETS",
    "resolve_target_modules", "LoraConfig", "LoraAdapter", "LoraLinear", "matches_target", "inject_lora",
    "inject_trainable_lora",
    "use_adapters", "set_live_adapters", "live_adapters", "adapter_names", "adapter_parameters", "adapter_modules",
    "set_adapter_scale", "merge_adapter", "merge_adapters", "unmerge_adapter", "record_live_adapters", "wrap_linear",
    "freeze_base", "lora_layers", "forget_lora_layers", "layers_with_adapter",
]
