"""Compiled FLUX transformer: ``paddle.jit.to_static`` (with CINN where Paddle has it) or a Paddle Inference predictor.

Both entry points return a :class:`CompiledTransformer`, called like ``FluxTransformer2DModel.forward``
(``hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance``,
``return_dict``) and exposing the model's ``config``, so a pipeline uses it in place of the model.

- :func:`compile_transformer`: the whole transformer as one static graph (``full_graph=True``), built with a
  ``paddle.static.BuildStrategy`` whose ``build_cinn_pass`` is on. The CINN / prim flags
  (``FLAGS_prim_enable_dynamic``, ``FLAGS_prim_all``, ``FLAGS_use_cinn``) are set only when
  ``paddle.is_compiled_with_cinn()``; on other builds (CPU wheels) one line says so and the static graph
  runs without CINN.
- :func:`build_predictor`: ``paddle.jit.save`` of that static graph, then ``paddle.inference`` with the
  IR optimisations: on CPU the oneDNN fusions (matmul + bias (+ activation) -> one fc kernel), on the GPU
  when Paddle has one.

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
        inputs = [hidden_states.astype(self.dtype), encoder_hidden_states.astype(self.dtype),
                  pooled_projections.astype(self.dtype), timestep.astype("float32"), img_ids.astype("float32"),
                  txt_ids.astype("float32")]
        if guidance is not None:
            inputs.append(guidance.astype("float32"))
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


def _predictor_config(prefix: Path, threads: Optional[int], use_cinn: bool):
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
        config.enable_onednn()
        # Keep the oneDNN fusions (matmul + bias + activation -> fc) but not the pass that moves every other op
        # onto oneDNN: its broadcasting elementwise kernels made the FLUX graph 1.6x slower than without oneDNN.
        config.delete_pass("onednn_placement_pass")
        config.set_cpu_math_library_num_threads(int(threads or os.environ.get("OMP_NUM_THREADS", 0) or
                                                    os.cpu_count() or 1))
    config.switch_ir_optim(True)
    # Paddle 3.3's inference inplace pass lets cos(a) overwrite `a` before sin(a) reads it (both feed one concat,
    # as in the sinusoidal timestep embedding), giving sin(cos(a)); without the pass the output is exact.
    config.delete_pass("inplace_pass")
    config.disable_glog_info()
    return config


def build_predictor(model: nn.Layer, save_dir: Union[str, Path, None] = None, threads: Optional[int] = None,
                    use_cinn: bool = False) -> CompiledTransformer:
    """Export the transformer with ``paddle.jit.save`` and run it with a Paddle Inference predictor.

    Args:
        save_dir: where ``transformer.json`` (or ``.pdmodel``) and ``transformer.pdiparams`` are written
            (a temporary folder when None; it lives as long as the returned object).
        threads: CPU math threads (default: ``OMP_NUM_THREADS`` or the number of cores).
        use_cinn: also compile with CINN inside the predictor (GPU builds with CINN; otherwise one line says
            that it is unavailable).
    """
    keep_alive = None
    if save_dir is None:
        keep_alive = tempfile.TemporaryDirectory(prefix="flux_predictor_")
        save_dir = keep_alive.name
    prefix = Path(save_dir) / "transformer"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paddle.jit.save(_static_graph(model, use_cinn=use_cinn, announce=use_cinn), str(prefix))
    predictor = paddle.inference.create_predictor(_predictor_config(prefix, threads, use_cinn))
    input_names = predictor.get_input_names()
    expected = list(_INPUT_NAMES[: len(transformer_input_spec(model))])
    if sorted(input_names) != sorted(expected):
        raise RuntimeError(f"exported graph has inputs {input_names}, expected {expected}")

    def run(inputs):
        by_name = dict(zip(expected, inputs))
        return predictor.run([by_name[name] for name in input_names])[0]

    compiled = CompiledTransformer(run, model.config, _model_dtype(model), "predictor")
    compiled.save_dir = Path(save_dir)
    compiled._keep_alive = keep_alive
    return compiled
