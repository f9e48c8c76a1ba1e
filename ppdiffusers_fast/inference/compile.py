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
  optimisations (on the GPU when Paddle has one). On CPU three measured changes to Paddle's defaults:
  broadcasting elementwise ops get their small operand expanded first (:func:`expand_broadcast_operands`,
  Paddle's CPU broadcast kernels are 5-10x slower than expand + same-shape op), intermediate buffers are kept
  between calls instead of being freed and allocated again by a garbage-collection thread
  (:class:`_PredictorRun`), and Paddle's own kernels instead of oneDNN (on by default in Paddle Inference;
  its fc fusions saved nothing here and its placement of every other op onto oneDNN made calls ~1.7x slower).
  Measured CPU time on 1 thread (``scripts/benchmark_inference.py``): 1.15-1.2x faster than dygraph for a
  4.85 M-parameter transformer at 320 tokens (matrix products, the same sgemm in both, are 40-45% of the
  predictor's time), 1.3x at 96 tokens, 1.75-1.95x on the demo-sized model (batch 10-20), where per-operator
  costs dominate.

Input shapes are dynamic in the batch, image-token and text-token dimensions (``InputSpec`` with ``None``),
so one compiled graph serves every resolution and batch size.

LoRA: compile or export a transformer whose LoRA is MERGED into the base weights
(``FluxPipeline.fuse_lora`` / ``models.lora.merge_adapter``): the graph then costs nothing extra and the
exported weights hold the student. A live, unmerged adapter is refused with an error, because its run-time
scale would be frozen into the graph silently.
"""
import logging
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import paddle
import paddle.nn as nn

from ..models.transformer_flux import FluxTransformerOutput

__all__ = ["CompiledTransformer", "compile_transformer", "build_predictor", "transformer_input_spec",
           "cinn_available", "enable_cinn_flags"]

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


def _predictor_config(prefix: Path, threads: Optional[int], use_cinn: bool, onednn: bool):
    model_file = prefix.with_suffix(".json")
    if not model_file.is_file():
        model_file = prefix.with_suffix(".pdmodel")
    config = paddle.inference.Config(str(model_file), str(prefix.with_suffix(".pdiparams")))
    if paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        config.enable_use_gpu(256, 0)
        if use_cinn and cinn_available():
            config.enable_cinn()
    else:
        config.disable_gpu()
        if onednn:
            config.enable_onednn()
            # Keep the oneDNN fusions (matmul + bias (+ gelu) -> fc, transpose + matmul -> fused_matmul) but not
            # the pass that moves every other op onto oneDNN: on FLUX's broadcasts ([B, L, H, D] * [1, L, 1, D],
            # [B, L, C] * [B, 1, C]) its elementwise kernels were 4x slower than Paddle's (33 ms against 8 ms of
            # multiplies per call at 320 tokens), making the whole call 1.7x slower.
            config.delete_pass("onednn_placement_pass")
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


_BROADCAST_OPS = ("pd_op.multiply", "pd_op.add", "pd_op.subtract", "pd_op.divide")


def _same_shape(a, b) -> bool:
    return list(a) == list(b)


def expand_broadcast_operands(model_file: Path) -> int:
    """Graph rewrite of a saved PIR program: every broadcasting elementwise op gets its smaller operand
    expanded first, ``a * b -> a * expand_as(b, a)`` (likewise +, -, /), when ``a`` has the output's shape.

    Paddle's CPU kernels broadcast with a per-element index computation: ``[1, 320, 256] * [1, 1, 256]`` takes
    about 250 us against 23 us for ``expand_as`` + the same-shape product (9x; 5-10x for every FLUX pattern:
    ``[B, L, H, D] * [1, L, 1, D]`` in the rotary embedding, ``[B, L, C] * [B, 1, C]`` in the adaLN modulation
    and gates). The values are bit-identical. Ops where both operands broadcast are left alone.

    Returns:
        the number of operands expanded (0 for a program that is not PIR JSON).
    """
    if model_file.suffix != ".json":
        return 0
    was_dynamic = paddle.in_dynamic_mode()
    paddle.enable_static()
    try:
        program = paddle.static.Program()
        paddle.base.core.deserialize_pir_program(str(model_file), program)
        expanded = 0
        with paddle.static.program_guard(program):
            for op in list(program.global_block().ops):
                if op.name() not in _BROADCAST_OPS:
                    continue
                a, b, out = op.operand_source(0), op.operand_source(1), op.result(0)
                if _same_shape(a.shape, b.shape):
                    continue
                for index, (full, small) in enumerate(((a, b), (b, a))):
                    if _same_shape(full.shape, out.shape):
                        paddle.pir.set_insertion_point(op)
                        op.operand(1 - index).set_source(paddle.expand_as(small, full))
                        expanded += 1
                        break
        paddle.base.core.serialize_pir_program(program, str(model_file), True, False, True)
    finally:
        if was_dynamic:
            paddle.disable_static()
    return expanded


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


def build_predictor(model: nn.Layer, save_dir: Union[str, Path, None] = None, threads: Optional[int] = None,
                    use_cinn: bool = False, onednn: bool = False, expand_broadcasts: bool = True,
                    keep_buffers_limit_mb: float = 512.0) -> CompiledTransformer:
    """Export the transformer with ``paddle.jit.save`` and run it with a Paddle Inference predictor.

    Args:
        save_dir: where ``transformer.json`` (or ``.pdmodel``) and ``transformer.pdiparams`` are written
            (a temporary folder when None; it lives as long as the returned object).
        threads: CPU math threads (default: ``OMP_NUM_THREADS`` or the number of cores).
        use_cinn: also compile with CINN inside the predictor (GPU builds with CINN; otherwise one line says
            that it is unavailable).
        onednn: CPU only: the oneDNN fusions (matmul + bias + gelu -> fc). Off by default: on the models
            measured (0.5-4.9 M parameters, 24-320 tokens) they were 0-15% slower than Paddle's own kernels,
            the layout conversions between oneDNN and plain ops costing what the fusions save.
        expand_broadcasts: CPU only: apply :func:`expand_broadcast_operands` to the saved graph.
        keep_buffers_limit_mb: CPU only: keep all intermediate buffers between calls (no per-call free /
            allocate, see :class:`_PredictorRun`) when they need at most this much memory at the first call's
            shapes; 0 turns it off.
    """
    keep_alive = None
    if save_dir is None:
        keep_alive = tempfile.TemporaryDirectory(prefix="flux_predictor_")
        save_dir = keep_alive.name
    prefix = Path(save_dir) / "transformer"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paddle.jit.save(_static_graph(model, use_cinn=use_cinn, announce=use_cinn), str(prefix))
    on_gpu = paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
    expanded = expand_broadcast_operands(prefix.with_suffix(".json")) if expand_broadcasts and not on_gpu else 0
    predictor = paddle.inference.create_predictor(_predictor_config(prefix, threads, use_cinn, onednn))
    input_names = predictor.get_input_names()
    expected = list(_INPUT_NAMES[: len(transformer_input_spec(model))])
    if sorted(input_names) != sorted(expected):
        raise RuntimeError(f"exported graph has inputs {input_names}, expected {expected}")
    run = _PredictorRun(predictor, input_names, expected, model.config, 0.0 if on_gpu else keep_buffers_limit_mb)
    compiled = CompiledTransformer(run, model.config, _model_dtype(model), "predictor")
    compiled.save_dir = Path(save_dir)
    compiled.onednn = onednn
    compiled.expanded_operands = expanded
    compiled._keep_alive = keep_alive
    return compiled
