"""Saving a small layer as a PIR program, running a saved program with a plain CPU predictor, listing its ops."""
from pathlib import Path

import paddle


def save_layer(layer: paddle.nn.Layer, specs, folder: Path, name: str = "layer") -> Path:
    """``paddle.jit.save`` of ``layer`` (with ``InputSpec`` list ``specs``) under ``folder``; returns the prefix."""
    prefix = Path(folder) / name
    paddle.jit.save(paddle.jit.to_static(layer, input_spec=specs, full_graph=True), str(prefix))
    return prefix


def run_saved(prefix: Path, arrays):
    """First output of the saved program on numpy ``arrays`` (Paddle's kernels, no oneDNN, no rewrites)."""
    config = paddle.inference.Config(str(prefix.with_suffix(".json")), str(prefix.with_suffix(".pdiparams")))
    config.disable_gpu()
    config.disable_onednn()
    config.disable_glog_info()
    predictor = paddle.inference.create_predictor(config)
    return predictor.run([paddle.to_tensor(a) for a in arrays])[0].numpy()


def op_names(model_file: Path):
    paddle.enable_static()
    try:
        program = paddle.static.Program()
        paddle.base.core.deserialize_pir_program(str(model_file), program)
        return [op.name() for op in program.global_block().ops]
    finally:
        paddle.disable_static()
