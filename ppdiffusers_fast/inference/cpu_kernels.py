"""The fused CPU kernels of ``cpu_kernels.cc``: compiled on first use, loaded as Paddle custom operators.

:func:`load_cpu_kernels` builds the C++ file with ``paddle.utils.cpp_extension.load`` (the C++ compiler and
Paddle's own headers; about 15 s once) into a cache folder keyed by the source, the compile flags, the Paddle
version and the CPU's instruction sets, and loads the library. The operators then exist for eager calls, for
static programs and for Paddle Inference predictors created afterwards in this process:

    kernels = load_cpu_kernels()
    out = kernels.flux_rope(x, cos, sin)      # x [B, L, H, D], cos / sin [1, L, 1, D]

Without a C++ compiler (or when the build fails) it returns None, :func:`cpu_kernels_unavailable_reason` says
why, and callers keep Paddle's unfused ops. A predictor saved with these operators in its graph needs them
loaded (this function) before it is created.

Cache folder: ``$PPDIFFUSERS_FAST_CACHE/cpu_kernels/<key>`` (default ``~/.cache/ppdiffusers_fast``).
"""
import contextlib
import hashlib
import io
import logging
import os
import platform
import shutil
import warnings
from pathlib import Path
from typing import Optional

import paddle

__all__ = ["load_cpu_kernels", "cpu_kernels_unavailable_reason", "KERNEL_NAMES", "kernel_cache_dir"]

logger = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("cpu_kernels.cc")
KERNEL_NAMES = ("flux_layer_norm_modulate", "flux_gated_residual", "flux_rope", "flux_rope_pack_qkv")
# -ffp-contract=off: no fused multiply-adds, so the kernels round like the separate ops they replace.
COMPILE_FLAGS = ("-O3", "-march=native", "-ffp-contract=off")
_state = {"loaded": False, "module": None, "reason": None}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def kernel_cache_dir() -> Path:
    """Build folder for this source, these flags, this Paddle and this CPU (``-march=native`` code)."""
    key = hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(COMPILE_FLAGS), paddle.__version__,
                                    platform.machine(), _cpu_flags()]).encode()).hexdigest()[:16]
    root = Path(os.environ.get("PPDIFFUSERS_FAST_CACHE", Path.home() / ".cache" / "ppdiffusers_fast"))
    return root / "cpu_kernels" / key


def _build_and_load():
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        raise RuntimeError("no C++ compiler found (c++ or $CXX)")
    build_dir = kernel_cache_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    import fcntl

    with open(build_dir / "build.lock", "w") as lock, warnings.catch_warnings():
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time across processes
        warnings.simplefilter("ignore")  # Paddle's notes about ccache and distutils
        from paddle.utils.cpp_extension import load

        if not any(build_dir.rglob("*.so")):
            print(f"Compiling the fused CPU kernels once into {build_dir} (about 15 s) ...", flush=True)
        output = io.StringIO()
        previous_level = logging.root.manager.disable
        logging.disable(logging.INFO)  # Paddle logs "using custom operator only" at every load
        try:
            with contextlib.redirect_stdout(output):
                return load(name="ppdiffusers_fast_cpu_kernels", sources=[str(SOURCE)],
                            extra_cxx_cflags=list(COMPILE_FLAGS), build_directory=str(build_dir), verbose=False)
        except Exception as err:  # compiler errors arrive as several exception types
            raise RuntimeError(f"building {SOURCE.name} in {build_dir} failed: {err}\n{output.getvalue()[-2000:]}")
        finally:
            logging.disable(previous_level)


def load_cpu_kernels():
    """The loaded kernel module (attributes :data:`KERNEL_NAMES`), or None where they cannot be built or are not
    wanted (``PPDIFFUSERS_FAST_CPU_KERNELS=0``). Built and loaded once per process."""
    if not _state["loaded"]:
        _state["loaded"] = True
        if os.environ.get("PPDIFFUSERS_FAST_CPU_KERNELS", "1") == "0":
            _state["reason"] = "turned off by PPDIFFUSERS_FAST_CPU_KERNELS=0"
        elif paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
            _state["reason"] = "a GPU is present: the kernels are for the CPU predictor"
        else:
            try:
                _state["module"] = _build_and_load()
            except RuntimeError as err:
                _state["reason"] = str(err)
        if _state["module"] is None:
            logger.warning("fused CPU kernels unavailable (%s); the predictor keeps Paddle's ops",
                           _state["reason"].splitlines()[0])
    return _state["module"]


def cpu_kernels_unavailable_reason() -> Optional[str]:
    """Why :func:`load_cpu_kernels` returned None (None when it loaded them or was not called yet)."""
    return _state["reason"]
