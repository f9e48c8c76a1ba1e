"""Compiled FLUX transformer: ``paddle.jit.to_static`` (with CINN where Paddle has it) or a Paddle Inference predictor.

Both entry points return a :class:`CompiledTransformer`, called like ``FluxTransformer2DModel.forward``
(``hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance``,
``return_dict``) and exposing the model's ``config``, so a pipeline uses it in place of the model.

- :func:`compile_transformer`: the whole transformer as one static graph (``full_graph=True``), built with a
  ``paddle.static.BuildStrategy`` whose ``build_cinn_pass`` is on. The CINN / prim flags
  (``FLAGS_prim_enable_dynamic``, ``FLAGS_prim_all``, ``FLAGS_use_cinn``) are set only when
  ``paddle.is_compiled_with_cinn()``; on other builds (CPU wheels) one line says so and the static graph
  runs without CINN.
- :func:`build_predictor`: ``paddle.jit.save`` of that static graph, then ``paddle.inference`` with the IR
  optimisations (on the GPU when Paddle has one). Everything is chosen through Paddle Inference's public
  ``Config``: on CPU oneDNN fuses every linear layer (matmul + bias (+ gelu)) into one ``fc`` op while every other
  op stays on Paddle's kernels (``delete_pass("onednn_placement_pass")``: oneDNN's placement of all ops was 1.4x
  slower); intermediate buffers are kept between calls instead of being freed and allocated again by a
  garbage-collection thread (:class:`_PredictorRun`, ``FLAGS_eager_delete_tensor_gb``);
  ``precision="bfloat16"`` runs the oneDNN ops in bfloat16 (``Config.enable_onednn_bfloat16``, CPUs with
  AVX512-BF16 / AMX).

Input shapes are dynamic in the batch, image-token and text-token dimensions (``InputSpec`` with ``None``),
so one compiled graph serves every resolution and batch size.

LoRA: compile or export a transformer whose LoRA is MERGED into the base weights
(``FluxPipeline.fuse_lora`` / ``models.lora.merge_adapter``): the graph then costs nothing extra and the
exported weights hold the student. A live, unmerged adapter is refused with an error, because its run-time
scale would be frozen into the graph silently.
"""
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Union

import paddle
import paddle.nn as nn

from ..models.transformer_flux import FluxTransformerOutput

__all__ = ["CompiledTransformer", "compile_transformer", "build_predictor", "transformer_input_spec",
           "cinn_available", "enable_cinn_flags", "bfloat16_available", "predictor_cache_key", "PRECISIONS"]

logger = logging.getLogger(__name__)
_INPUT_NAMES = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids",
                "guidance")


class _PositionalForward(nn.Layer):
    """``forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids[, guidance])``
    -> ``sample [B, L_img, out_channels]``: the transformer with tensor-only inputs and output, as a graph needs."""

    def __init__(self, model: nn.Layer):
        super().__init__()
        self.model = model

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                guidance=None):
        return self.model(hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                          guidance, return_dict=False)[0]


def cinn_available() -> bool:
    return bool(paddle.is_compiled_with_cinn())


def enable_cinn_flags() -> None:
    """Turn on CINN and the primitive-operator decomposition it compiles (dynamic shapes included)."""
    flags = {"FLAGS_prim_enable_dynamic": True, "FLAGS_prim_all": True, "FLAGS_use_cinn": True}
    for name, value in flags.items():
        os.environ[name] = "true" if value else "false"
    try:
        paddle.set_flags(flags)
    except (ValueError, RuntimeError) as err:  # a flag unknown to this build: the environment variables remain
        logger.warning("could not set %s at run time (%s); they are set in the environment", list(flags), err)


def transformer_input_spec(model: nn.Layer, dtype: Optional[str] = None):
    """``InputSpec`` list for :class:`_PositionalForward` with dynamic batch / token dimensions.

    Latents and text states in the model's dtype; timestep, guidance and ids in float32.
    """
    cfg = model.config
    dtype = dtype or str(model.x_embedder.weight.dtype).replace("paddle.", "")
    spec = paddle.static.InputSpec
    specs = [
        spec([None, None, cfg.in_channels], dtype, "hidden_states"),
        spec([None, None, cfg.joint_attention_dim], dtype, "encoder_hidden_states"),
        spec([None, cfg.pooled_projection_dim], dtype, "pooled_projections"),
        spec([None], "float32", "timestep"),
        spec([None, 3], "float32", "img_ids"),
        spec([None, 3], "float32", "txt_ids"),
    ]
    if cfg.guidance_embeds:
        specs.append(spec([None], "float32", "guidance"))
    return specs


def _refuse_live_adapters(model: nn.Layer) -> None:
    from ..models.lora import lora_layers

    unmerged = sorted({name for _, layer in lora_layers(model) for name in layer.live_adapters
                       if name in layer.lora_adapters and layer.lora_adapters[name].merged_scale is None})
    if unmerged:
        raise ValueError(f"LoRA adapter(s) {unmerged} are live but not merged: merge them before compiling "
                         "(FluxPipeline.fuse_lora() or models.lora.merge_adapter), so that the graph holds the student")


def _as_dtype(tensor: paddle.Tensor, dtype: str) -> paddle.Tensor:
    """``tensor`` itself when it already has ``dtype`` (no cast kernel), else a cast copy."""
    return tensor if str(tensor.dtype).replace("paddle.", "") == dtype else tensor.astype(dtype)


class CompiledTransformer:
    """A compiled transformer called like the model (``return_block_features`` is not available).

    Attributes:
        config: the model's config (``guidance_embeds``, ``in_channels``, ...).
        kind: "to_static" or "predictor".
    """

    def __init__(self, run, config, dtype: str, kind: str):
        self._run = run
        self.config = config
        self.dtype = dtype
        self.kind = kind

    def __call__(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                 guidance=None, return_block_features: bool = False, return_dict: bool = True):
        if return_block_features:
            raise ValueError(f"a {self.kind} transformer returns the sample only; use the dygraph model for features")
        if bool(self.config.guidance_embeds) != (guidance is not None):
            raise ValueError(f"guidance must be {'given' if self.config.guidance_embeds else 'None'} for this model "
                             f"(guidance_embeds={self.config.guidance_embeds})")
        if img_ids.ndim == 3:
            img_ids = img_ids[0]
        if txt_ids.ndim == 3:
            txt_ids = txt_ids[0]
        inputs = [_as_dtype(hidden_states, self.dtype), _as_dtype(encoder_hidden_states, self.dtype),
                  _as_dtype(pooled_projections, self.dtype), _as_dtype(timestep, "float32"),
                  _as_dtype(img_ids, "float32"), _as_dtype(txt_ids, "float32")]
        if guidance is not None:
            inputs.append(_as_dtype(guidance, "float32"))
        sample = self._run(inputs)
        return FluxTransformerOutput(sample=sample) if return_dict else (sample,)


def _model_dtype(model: nn.Layer) -> str:
    return str(model.x_embedder.weight.dtype).replace("paddle.", "")


def _static_graph(model: nn.Layer, use_cinn: bool, announce: bool):
    _refuse_live_adapters(model)
    model.eval()
    build_strategy = paddle.static.BuildStrategy()
    build_strategy.build_cinn_pass = bool(use_cinn)
    if use_cinn:
        if cinn_available():
            enable_cinn_flags()
        elif announce:
            print("CINN is not available in this Paddle build (paddle.is_compiled_with_cinn() is False): "
                  "running the to_static graph without CINN.")
    return paddle.jit.to_static(_PositionalForward(model), input_spec=transformer_input_spec(model),
                                build_strategy=build_strategy, full_graph=True)


def compile_transformer(model: nn.Layer, use_cinn: bool = True) -> CompiledTransformer:
    """The transformer as one ``paddle.jit.to_static`` graph (CINN on when Paddle has it). See the module doc."""
    static = _static_graph(model, use_cinn, announce=True)

    def run(inputs):
        with paddle.no_grad():
            return static(*inputs)

    return CompiledTransformer(run, model.config, _model_dtype(model), "to_static")


def _predictor_config(prefix: Path, threads: Optional[int], use_cinn: bool, onednn: bool, precision: str):
    model_file = prefix.with_suffix(".json")
    if not model_file.is_file():
        model_file = prefix.with_suffix(".pdmodel")
    config = paddle.inference.Config(str(model_file), str(prefix.with_suffix(".pdiparams")))
    if _on_gpu():
        config.enable_use_gpu(256, 0)
        if use_cinn and cinn_available():
            config.enable_cinn()
    else:
        config.disable_gpu()
        if onednn:
            config.enable_onednn()
            # Keep the oneDNN fusions (matmul + bias (+ gelu) -> fc) but not the pass that moves every other op
            # onto oneDNN: its elementwise, mean and stack kernels were 1.5-10x slower than Paddle's here
            # (stack 635 us against 50 us at 320 tokens), making the whole call 1.4x slower.
            config.delete_pass("onednn_placement_pass")
            if precision == "bfloat16":
                config.enable_onednn_bfloat16()
        else:
            config.disable_onednn()  # Paddle Inference turns oneDNN on by default on CPU
        config.set_cpu_math_library_num_threads(int(threads or os.environ.get("OMP_NUM_THREADS", 0) or
                                                    os.cpu_count() or 1))
    config.switch_ir_optim(True)
    # Paddle 3.3's inference inplace pass lets cos(a) overwrite `a` before sin(a) reads it (both feed one concat,
    # as in the sinusoidal timestep embedding), giving sin(cos(a)); without the pass the output is exact.
    config.delete_pass("inplace_pass")
    config.disable_glog_info()
    return config


def _on_gpu() -> bool:
    return paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0


PRECISIONS = ("float32", "bfloat16")


def bfloat16_available() -> bool:
    """The CPU computes bfloat16 natively (AVX512-BF16 or AMX) and Paddle has oneDNN."""
    core = paddle.base.core
    return (not _on_gpu() and core.is_compiled_with_mkldnn()
            and bool(getattr(core, "supports_bfloat16_fast_performance", lambda: False)()))


def kept_buffer_bytes(config, batch: int, image_tokens: int, text_tokens: int) -> int:
    """Upper estimate of all intermediate tensors of one transformer call (what the predictor keeps when its
    garbage collection is off): 100 activations ``[B, L, C]`` and 4 attention maps ``[B, H, L, L]`` per block,
    4 bytes each. For 3 blocks, C = 256, H = 4, L = 320 it gives 118 MB; the process grew by 75-86 MB."""
    tokens = image_tokens + text_tokens
    blocks = config.num_layers + config.num_single_layers
    inner = config.num_attention_heads * config.attention_head_dim
    per_block = 100 * batch * tokens * inner + 4 * batch * config.num_attention_heads * tokens * tokens
    return 4 * blocks * per_block


class _PredictorRun:
    """Runs a Paddle Inference predictor on paddle tensors; returns a fresh output tensor.

    The predictor's output tensor is its internal buffer, which the next call with the same shapes overwrites
    (true CFG calls the transformer twice per step), so the output is cloned.

    Buffer reuse: by default the PIR executor frees every intermediate tensor right after its last use, through
    a garbage-collection thread, and allocates it again on the next call; on a small model this bookkeeping
    costs about a third of the CPU time of a call. With ``FLAGS_eager_delete_tensor_gb < 0`` at the FIRST run
    (the executor reads it once, when it builds its collector) nothing is freed and every later call writes
    into the same buffers. It is used when :func:`kept_buffer_bytes` for the first call's shapes is below
    ``keep_buffers_limit_mb``; the flag is restored right after that run.
    """

    def __init__(self, predictor, input_names, expected_names, model_config, keep_buffers_limit_mb: float):
        self.predictor = predictor
        self.input_names = input_names
        self.expected_names = expected_names
        self.model_config = model_config
        self.keep_buffers_limit_mb = keep_buffers_limit_mb
        self.keeps_buffers = None  # decided at the first call

    def __call__(self, inputs):
        by_name = dict(zip(self.expected_names, inputs))
        ordered = [by_name[name] for name in self.input_names]
        if self.keeps_buffers is None:
            hidden, text = by_name["hidden_states"], by_name["encoder_hidden_states"]
            size = kept_buffer_bytes(self.model_config, hidden.shape[0], hidden.shape[1], text.shape[1])
            self.keeps_buffers = size <= self.keep_buffers_limit_mb * 2**20
            previous = paddle.get_flags(["FLAGS_eager_delete_tensor_gb"])
            paddle.set_flags({"FLAGS_eager_delete_tensor_gb": -1.0 if self.keeps_buffers else 0.0})
            try:
                output = self.predictor.run(ordered)[0]
            finally:
                paddle.set_flags(previous)
        else:
            output = self.predictor.run(ordered)[0]
        return output.clone()


PREDICTOR_KEY_FILE = "cache_key.txt"


def predictor_cache_key(model: nn.Layer, sources: Sequence[str], use_cinn: bool = False) -> str:
    """SHA-256 naming one exported predictor: ``sources`` (strings identifying the weights, e.g. file names with
    sizes and modification times, and the LoRA file's digest and scale), the model's config and dtype, and the
    Paddle version and commit that wrote the graph."""
    parts = [*map(str, sources), json.dumps(dict(model.config), sort_keys=True, default=str), _model_dtype(model),
             paddle.__version__, getattr(paddle.version, "commit", ""), f"cinn={bool(use_cinn)}"]
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()


def _saved_predictor_matches(save_dir: Path, cache_key: Optional[str]) -> bool:
    key_file = save_dir / PREDICTOR_KEY_FILE
    prefix = save_dir / "transformer"
    graph_saved = prefix.with_suffix(".json").is_file() or prefix.with_suffix(".pdmodel").is_file()
    return (cache_key is not None and graph_saved and prefix.with_suffix(".pdiparams").is_file()
            and key_file.is_file() and key_file.read_text().strip() == cache_key)


def _export(model: nn.Layer, save_dir: Path, use_cinn: bool, cache_key: Optional[str]) -> None:
    """``paddle.jit.save`` into a sibling temporary folder, then rename it to ``save_dir`` (a reader never sees a
    half-written graph); the cache key is written last, inside the temporary folder."""
    save_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{save_dir.name}.", dir=save_dir.parent))
    try:
        paddle.jit.save(_static_graph(model, use_cinn=use_cinn, announce=use_cinn), str(staging / "transformer"))
        if cache_key is not None:
            (staging / PREDICTOR_KEY_FILE).write_text(cache_key + "\n")
        if save_dir.exists():
            shutil.rmtree(save_dir)
        os.replace(staging, save_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def build_predictor(model: nn.Layer, save_dir: Union[str, Path, None] = None, threads: Optional[int] = None,
                    use_cinn: bool = False, onednn: bool = True, keep_buffers_limit_mb: float = 512.0,
                    precision: str = "float32", cache_key: Optional[str] = None) -> CompiledTransformer:
    """Export the transformer with ``paddle.jit.save`` and run it with a Paddle Inference predictor.

    Args:
        save_dir: where ``transformer.json`` (or ``.pdmodel``) and ``transformer.pdiparams`` are written
            (a temporary folder when None; it lives as long as the returned object).
        threads: CPU math threads (default: ``OMP_NUM_THREADS`` or the number of cores).
        use_cinn: also compile with CINN inside the predictor (GPU builds with CINN; otherwise one line says
            that it is unavailable).
        onednn: CPU only: oneDNN's fc fusions (matmul + bias (+ gelu) -> one ``fc`` op), every other op on
            Paddle's kernels.
        keep_buffers_limit_mb: CPU only: keep all intermediate buffers between calls (no per-call free /
            allocate, see :class:`_PredictorRun`) when they need at most this much memory at the first call's
            shapes; 0 turns it off.
        precision: "float32", or "bfloat16" (CPU with native bfloat16, see :func:`bfloat16_available`;
            needs ``onednn``): Paddle Inference runs its oneDNN ops in bfloat16
            (``Config.enable_onednn_bfloat16``). Outputs then differ from float32 by bfloat16 rounding.
        cache_key: from :func:`predictor_cache_key`. When ``save_dir`` already holds a graph exported under the
            same key, it is loaded without exporting again (``compiled.reused`` is True); otherwise the graph
            is exported and the key written beside it.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bfloat16" and not (onednn and bfloat16_available()):
        raise ValueError("precision='bfloat16' needs a CPU with native bfloat16 (AVX512-BF16 / AMX), a Paddle "
                         "build with oneDNN and onednn=True")
    if precision == "bfloat16" and _model_dtype(model) != "float32":
        raise ValueError(f"precision='bfloat16' runs a float32 model, got a {_model_dtype(model)} one")
    keep_alive = None
    if save_dir is None:
        keep_alive = tempfile.TemporaryDirectory(prefix="flux_predictor_")
        save_dir = keep_alive.name
    save_dir = Path(save_dir)
    reused = _saved_predictor_matches(save_dir, cache_key)
    if reused:
        _refuse_live_adapters(model)
    else:
        _export(model, save_dir, use_cinn, cache_key)
    prefix = save_dir / "transformer"
    on_gpu = _on_gpu()
    predictor = paddle.inference.create_predictor(_predictor_config(prefix, threads, use_cinn, onednn, precision))
    input_names = predictor.get_input_names()
    expected = list(_INPUT_NAMES[: len(transformer_input_spec(model))])
    if sorted(input_names) != sorted(expected):
        raise RuntimeError(f"exported graph has inputs {input_names}, expected {expected}")
    run = _PredictorRun(predictor, input_names, expected, model.config, 0.0 if on_gpu else keep_buffers_limit_mb)
    compiled = CompiledTransformer(run, model.config, _model_dtype(model), "predictor")
    compiled.save_dir = save_dir
    compiled.onednn = onednn
    compiled.precision = precision
    compiled.reused = reused
    compiled._keep_alive = keep_alive
    return compiled
