"""ppdiffusers_fast (Paddle) against diffusers (PyTorch) on the same random weights, side by side.

The PyTorch side runs in the reference environment (``--torch_python``, default ``/work/venv-ref/bin/python``) as a
worker subprocess of this same script; it creates the random models, saves them with ``save_pretrained``
(safetensors) and this process loads them with ``models.weights``, so both run identical weights and inputs.
Every measurement alternates between the two processes in interleaved rounds (ours, then torch, then ours...),
each process with one math thread, so that load from other jobs on a shared machine hits both alike; the table
gives median process CPU time per call (the robust figure when cores are shared) and median wall time.

Rows:
- transformer forward (2 double + 4 single blocks, 4 heads x 64, 64 text tokens) at 64 / 256 / 1024 image tokens,
  batch 1 and 4: ours in dygraph, ``to_static`` and the Paddle Inference predictor, torch eager (GPU mode:
  ``torch.compile`` against ``to_static`` with CINN); output agreement per shape;
- LoRA training step (rank 16, reference targets, AdamW, batch 4, 256 + 64 tokens): plain flow matching, and a PCM
  step (student forward with gradients, teacher forward with adapters off, target forward, one backward) against
  diffusers + peft;
- generation: the bundled demo model and student LoRA, 16 images x 4 steps, through the generation command line's
  default path (LoRA merged, dygraph) against diffusers' ``FluxPipeline`` with the LoRA loaded and fused;
- cold start: a fresh process to the first image of the demo model, ours with ``--inference_optimize`` and its
  predictor already cached on disk, against diffusers;
- peak memory (max RSS) of a process doing the training step.

    python scripts/benchmark_vs_torch.py [--quick] [--device cpu|gpu] [--output docs/performance.md]
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "examples" / "flux_lightning" / "demo_model"
MODEL = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=64,
             num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=True,
             axes_dims_rope=[16, 24, 24])
TEXT_TOKENS = 64
LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                "ff_context.net.2"]
TRAIN_SHAPE = dict(batch=4, image_tokens=256)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="64 and 256 tokens only, fewer rounds (a few minutes)")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5, quick 3)")
    p.add_argument("--torch_python", default="/work/venv-ref/bin/python")
    p.add_argument("--output", default=str(REPO / "docs" / "performance.md"), help="markdown table ('' = none)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: forward,train,generate,cold,ops,memory")
    p.add_argument("--worker", choices=["torch", "ours_memory", "torch_memory", "torch_cold"], help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------- shared
def make_inputs(batch, image_tokens, seed=0):
    """Numpy inputs of one transformer call: latents, text states, pooled, timestep, ids, guidance."""
    import numpy as np

    rng = np.random.default_rng(seed + 1000 * batch + image_tokens)
    side = int(round(image_tokens ** 0.5))
    rows, cols = side, image_tokens // side
    img_ids = np.zeros([rows, cols, 3], np.float32)
    img_ids[..., 1] = np.arange(rows)[:, None]
    img_ids[..., 2] = np.arange(cols)[None, :]
    return dict(hidden_states=rng.standard_normal([batch, rows * cols, MODEL["in_channels"]]).astype(np.float32),
                encoder_hidden_states=rng.standard_normal([batch, TEXT_TOKENS, MODEL["joint_attention_dim"]])
                .astype(np.float32),
                pooled_projections=rng.standard_normal([batch, MODEL["pooled_projection_dim"]]).astype(np.float32),
                timestep=np.linspace(0.2, 0.9, batch).astype(np.float32),
                img_ids=img_ids.reshape(-1, 3), txt_ids=np.zeros([TEXT_TOKENS, 3], np.float32),
                guidance=np.full([batch], 3.5, np.float32))


# Single ops where the frameworks' kernels differ, at the sizes of the 1024-token batch-4 forward:
# name -> (description, shapes). Both sides build the same arrays and run the same expression.
SINGLE_OPS = {
    "linear": "linear 256 -> 1024 with bias, x [4, 1088, 256] (ours: addmm; torch: F.linear)",
    "broadcast_mul": "x * g[:, None], x [4, 1088, 256], g [4, 256]",
    "same_shape_mul": "x * y, both [4, 1088, 256]",
    "softmax": "softmax over the last axis of [4, 4, 1088, 1088]",
    "attention": "scaled_dot_product_attention, q = k = v [4, 4, 1088, 64] (Paddle's [B, L, H, D] layout)",
    "layer_norm": "layer_norm without affine, [4, 1088, 256]",
}


def single_op_arrays():
    import numpy as np

    rng = np.random.default_rng(0)
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    return dict(x=f(4, 1088, 256), y=f(4, 1088, 256), g=f(4, 256), w=f(256, 1024), b=f(1024),
                scores=f(4, 4, 1088, 1088), q=f(4, 1088, 4, 64))


def timed(fn, repeats, sync=lambda: None):
    """``(cpu_ms list, wall_ms list)`` of ``repeats`` calls."""
    cpu, wall = [], []
    for _ in range(repeats):
        c, w = time.process_time(), time.perf_counter()
        fn()
        sync()
        cpu.append(1000 * (time.process_time() - c))
        wall.append(1000 * (time.perf_counter() - w))
    return cpu, wall


def max_rss_mb():
    """Peak resident memory of this process since its exec (``VmHWM``; ``ru_maxrss`` would also count the pages
    of the parent that forked it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------------- torch side
class TorchSide:
    """Runs in the reference environment: diffusers + peft."""

    def __init__(self, workdir, device):
        import torch

        torch.set_num_threads(1)
        self.torch, self.workdir = torch, Path(workdir)
        self.device = "cuda" if device == "gpu" else "cpu"
        self.cache = {}

    def sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def create_model(self):
        from diffusers import FluxTransformer2DModel

        torch = self.torch
        generator = torch.Generator().manual_seed(0)
        model = FluxTransformer2DModel(**MODEL).eval()
        with torch.no_grad():
            for name, param in model.named_parameters():
                base = 1.0 if "norm" in name and name.endswith(".weight") and "linear" not in name else 0.0
                param.copy_(base + 0.05 * torch.randn(param.shape, generator=generator))
        model.save_pretrained(self.workdir / "transformer", safe_serialization=True)
        return {"folder": str(self.workdir / "transformer")}

    def model(self, compiled=False):
        key = ("model", compiled)
        if key not in self.cache:
            from diffusers import FluxTransformer2DModel

            model = FluxTransformer2DModel.from_pretrained(self.workdir / "transformer").eval().to(self.device)
            self.cache[key] = self.torch.compile(model) if compiled else model
        return self.cache[key]

    def tensors(self, batch, image_tokens):
        import numpy as np

        arrays = make_inputs(batch, image_tokens)
        return {k: self.torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for k, v in arrays.items()}

    def forward(self, batch, image_tokens, repeats, mode="eager", save=None):
        model, inputs = self.model(compiled=mode == "compile"), self.tensors(batch, image_tokens)
        with self.torch.no_grad():
            run = lambda: model(**inputs, return_dict=False)[0]  # noqa: E731
            out = run()
            if save:
                import numpy as np

                np.save(save, out.float().cpu().numpy())
            cpu, wall = timed(run, repeats, self.sync)
        return {"cpu": cpu, "wall": wall}

    def single_op(self, name, repeats):
        import torch.nn.functional as F

        if "arrays" not in self.cache:
            self.cache["arrays"] = {k: self.torch.from_numpy(v).to(self.device) for k, v in single_op_arrays().items()}
        a = self.cache["arrays"]
        q = a["q"].transpose(1, 2)  # torch's [B, H, L, D] layout
        run = {"linear": lambda: F.linear(a["x"], a["w"].T, a["b"]), "broadcast_mul": lambda: a["x"] * a["g"][:, None],
               "same_shape_mul": lambda: a["x"] * a["y"], "softmax": lambda: self.torch.softmax(a["scores"], -1),
               "attention": lambda: F.scaled_dot_product_attention(q, q, q),
               "layer_norm": lambda: F.layer_norm(a["x"], [256], eps=1e-6)}[name]
        with self.torch.no_grad():
            run()
            cpu, wall = timed(run, repeats, self.sync)
        return {"cpu": cpu, "wall": wall}

    def _trainer(self, kind):
        key = ("train", kind)
        if key not in self.cache:
            from diffusers import FluxTransformer2DModel
            from peft import LoraConfig

            torch = self.torch
            model = FluxTransformer2DModel.from_pretrained(self.workdir / "transformer").to(self.device)
            model.requires_grad_(False)
            model.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=LORA_TARGETS, init_lora_weights=True))
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=1e-4)
            self.cache[key] = (model, optimizer)
        return self.cache[key]

    def train_step(self, kind, repeats):
        torch = self.torch
        model, optimizer = self._trainer(kind)
        inputs = self.tensors(TRAIN_SHAPE["batch"], TRAIN_SHAPE["image_tokens"])
        target = torch.randn_like(inputs["hidden_states"])

        def step():
            optimizer.zero_grad(set_to_none=True)
            if kind == "pcm":
                with torch.no_grad():
                    model.disable_adapters()
                    teacher = model(**inputs, return_dict=False)[0]
                    model.enable_adapters()
                    ema_target = model(**inputs, return_dict=False)[0]
                prediction = model(**inputs, return_dict=False)[0]
                loss = ((prediction - (teacher + ema_target) * 0.5) ** 2).mean()
            else:
                loss = ((model(**inputs, return_dict=False)[0] - target) ** 2).mean()
            loss.backward()
            optimizer.step()

        step()
        cpu, wall = timed(step, repeats, self.sync)
        return {"cpu": cpu, "wall": wall}

    def _pipeline(self):
        if "pipe" not in self.cache:
            from diffusers import FluxPipeline

            # the reference environment has no sentencepiece for the demo's T5 tokenizer: the prompt embeddings
            # come from our side (prompt_embeds.npz), the text encoders are not loaded
            pipe = FluxPipeline.from_pretrained(str(DEMO_MODEL), tokenizer_2=None, text_encoder_2=None,
                                                tokenizer=None, text_encoder=None).to(self.device)
            pipe.load_lora_weights(str(self.workdir / "student_diffusers_lora.safetensors"))
            pipe.fuse_lora()
            pipe.set_progress_bar_config(disable=True)
            self.cache["pipe"] = pipe
        return self.cache["pipe"]

    def prompt_embeds(self):
        import numpy as np

        saved = np.load(self.workdir / "prompt_embeds.npz")
        return {"prompt_embeds": self.torch.from_numpy(saved["sequence"]).to(self.device),
                "pooled_prompt_embeds": self.torch.from_numpy(saved["pooled"]).to(self.device)}

    def generate(self, repeats, prompt, images, steps, size):
        pipe, embeds = self._pipeline(), self.prompt_embeds()
        run = lambda: pipe(num_images_per_prompt=images, num_inference_steps=steps, height=size,  # noqa
                           width=size, max_sequence_length=8, guidance_scale=3.5, output_type="pil",
                           generator=self.torch.Generator().manual_seed(0), **embeds)
        run()
        cpu, wall = timed(run, repeats, self.sync)
        return {"cpu": cpu, "wall": wall}


def torch_worker(args):
    side = TorchSide(args.workdir, args.device)
    for line in sys.stdin:
        request = json.loads(line)
        result = getattr(side, request.pop("op"))(**request)
        print(json.dumps(result), flush=True)


class TorchClient:
    def __init__(self, args, workdir):
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        env.pop("PYTHONPATH", None)
        self.process = subprocess.Popen([args.torch_python, __file__, "--worker", "torch", "--workdir", str(workdir),
                                         "--device", args.device], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, env=env)

    def __call__(self, op, **kwargs):
        self.process.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the torch worker stopped during {op} (exit code {self.process.poll()})")
        return json.loads(line)

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=60)


# ---------------------------------------------------------------------------------------------------- our side
class OurSide:
    def __init__(self, workdir, device):
        import paddle

        paddle.set_device("gpu" if device == "gpu" else "cpu")
        self.paddle, self.workdir, self.device = paddle, Path(workdir), device
        self.cache = {}

    def sync(self):
        if self.device == "gpu":
            self.paddle.device.synchronize()

    def load_model(self):
        from ppdiffusers_fast.models.transformer_flux import FluxTransformer2DModel
        from ppdiffusers_fast.models.weights import load_weights_into

        model = FluxTransformer2DModel(**MODEL)
        load_weights_into(model, self.workdir / "transformer")
        return model

    def runner(self, mode):
        if mode not in self.cache:
            from ppdiffusers_fast.inference.compile import build_predictor, compile_transformer

            model = self.cache.setdefault("dygraph_model", self.load_model())
            model.eval()
            if mode == "dygraph":
                self.cache[mode] = model
            elif mode == "to_static":
                self.cache[mode] = compile_transformer(model, use_cinn=True)
            else:
                self.cache[mode] = build_predictor(model, threads=1)
        return self.cache[mode]

    def tensors(self, batch, image_tokens):
        return {k: self.paddle.to_tensor(v) for k, v in make_inputs(batch, image_tokens).items()}

    def forward(self, batch, image_tokens, repeats, mode, save=None):
        import numpy as np

        run_model, inputs = self.runner(mode), self.tensors(batch, image_tokens)
        with self.paddle.no_grad():
            run = lambda: run_model(**inputs, return_dict=False)[0]  # noqa: E731
            out = run()
            if save:
                np.save(save, out.numpy())
            cpu, wall = timed(run, repeats, self.sync)
        return {"cpu": cpu, "wall": wall}

    def single_op(self, name, repeats):
        import paddle.nn.functional as F

        from ppdiffusers_fast.models.ops import linear

        paddle = self.paddle
        if "arrays" not in self.cache:
            self.cache["arrays"] = {k: paddle.to_tensor(v) for k, v in single_op_arrays().items()}
        a = self.cache["arrays"]
        run = {"linear": lambda: linear(a["x"], a["w"], a["b"]), "broadcast_mul": lambda: a["x"] * a["g"][:, None],
               "same_shape_mul": lambda: a["x"] * a["y"], "softmax": lambda: F.softmax(a["scores"], -1),
               "attention": lambda: F.scaled_dot_product_attention(a["q"], a["q"], a["q"]),
               "layer_norm": lambda: F.layer_norm(a["x"], [256], epsilon=1e-6)}[name]
        with paddle.no_grad():
            run()
            cpu, wall = timed(run, repeats, self.sync)
        return {"cpu": cpu, "wall": wall}

    def _trainer(self, kind):
        key = ("train", kind)
        if key not in self.cache:
            from ppdiffusers_fast.models.lora import LoraConfig, inject_lora, set_live_adapters

            paddle = self.paddle
            model = self.load_model()
            for param in model.parameters():
                param.stop_gradient = True
            inject_lora(model, LoraConfig(rank=16, alpha=16.0, target_modules=tuple(LORA_TARGETS)), "student")
            set_live_adapters(model, "student")
            model.train()
            params = [p for p in model.parameters() if not p.stop_gradient]
            optimizer = paddle.optimizer.AdamW(learning_rate=1e-4, parameters=params, weight_decay=0.01)
            self.cache[key] = (model, optimizer)
        return self.cache[key]

    def train_step(self, kind, repeats):
        from ppdiffusers_fast.models.lora import use_adapters
        from ppdiffusers_fast.models.ops import dense_results

        paddle = self.paddle
        model, optimizer = self._trainer(kind)
        inputs = self.tensors(TRAIN_SHAPE["batch"], TRAIN_SHAPE["image_tokens"])
        target = paddle.randn(inputs["hidden_states"].shape)

        def step():  # under dense_results, as the trainer runs its steps
            with dense_results():
                plain_or_pcm_step()

        def plain_or_pcm_step():
            optimizer.clear_grad(set_to_zero=False)
            if kind == "pcm":
                with paddle.no_grad():
                    with use_adapters(model):
                        teacher = model(**inputs, return_dict=False)[0]
                    ema_target = model(**inputs, return_dict=False)[0]
                prediction = model(**inputs, return_dict=False)[0]
                loss = ((prediction - (teacher + ema_target) * 0.5) ** 2).mean()
            else:
                loss = ((model(**inputs, return_dict=False)[0] - target) ** 2).mean()
            loss.backward()
            optimizer.step()

        step()
        cpu, wall = timed(step, repeats, self.sync)
        return {"cpu": cpu, "wall": wall}

    def _pipeline(self, prompt, images, steps, size):
        if "pipe" not in self.cache:
            from ppdiffusers_fast.inference import generate_cli

            argv = ["--pretrained_model_name_or_path", str(DEMO_MODEL), "--path_to_lora",
                    str(DEMO_MODEL / "student_lora.safetensors"), "--prompt", prompt, "--num_images", str(images),
                    "--step", str(steps), "--height", str(size), "--width", str(size), "--max_sequence_length", "8"]
            args = generate_cli.build_parser().parse_args(argv)
            generate_cli.apply_flux_defaults(args)
            pipe = generate_cli.build_pipeline(args)
            pipe.set_progress_bar_config(disable=True)
            self.cache["pipe"] = (pipe, args, generate_cli)
        return self.cache["pipe"]

    def generate(self, repeats, prompt, images, steps, size):
        pipe, args, cli = self._pipeline(prompt, images, steps, size)
        run = lambda: cli.generate(pipe, args, [prompt])  # noqa: E731
        run()
        cpu, wall = timed(run, repeats, self.sync)
        return {"cpu": cpu, "wall": wall}

    def export_student_for_diffusers(self, prompt):
        """The demo student as a diffusers LoRA file and the prompt's embeddings (``prompt_embeds.npz``) for the
        torch side."""
        import numpy as np

        from ppdiffusers_fast.models.lora_io import export_diffusers_lora
        from ppdiffusers_fast.pipelines.pipeline_flux import FluxPipeline

        pipe = FluxPipeline.from_pretrained(str(DEMO_MODEL))
        pipe.load_lora(str(DEMO_MODEL / "student_lora.safetensors"), adapter_name="student")
        export_diffusers_lora(pipe.transformer, "student", self.workdir / "student_diffusers_lora.safetensors")
        with self.paddle.no_grad():
            embeddings = pipe.encode_prompt([prompt], max_sequence_length=8)
        np.savez(self.workdir / "prompt_embeds.npz", sequence=embeddings.sequence.numpy(),
                 pooled=embeddings.pooled.numpy())


# ---------------------------------------------------------------------------------------------------- driver
def median(values):
    return statistics.median(values) if values else float("nan")


def interleave(rounds, ours_fn, torch_fn):
    """Alternate ``rounds`` times; returns {"ours": {"cpu": [...], "wall": [...]}, "torch": ...}."""
    result = {"ours": {"cpu": [], "wall": []}, "torch": {"cpu": [], "wall": []}}
    for _ in range(rounds):
        for side, fn in (("ours", ours_fn), ("torch", torch_fn)):
            out = fn()
            result[side]["cpu"] += out["cpu"]
            result[side]["wall"] += out["wall"]
    return result


def row(name, ours, theirs, note=""):
    oc, tc = median(ours["cpu"]), median(theirs["cpu"])
    ow, tw = median(ours["wall"]), median(theirs["wall"])
    line = {"work": name, "ours_cpu": oc, "torch_cpu": tc, "ratio_cpu": oc / tc, "ours_wall": ow, "torch_wall": tw,
            "ratio_wall": ow / tw, "note": note}
    print(f"{name:62s} ours {oc:9.1f} ms  torch {tc:9.1f} ms  ratio {oc / tc:5.2f}x   (wall {ow:8.1f} / {tw:8.1f} ms, "
          f"{ow / tw:5.2f}x) {note}", flush=True)
    return line


def cold_start(args, workdir, rounds):
    """Fresh processes to the first demo image: ours with a cached predictor (one untimed run fills the cache)."""
    cache = workdir / "cache"
    env = dict(os.environ, OMP_NUM_THREADS="1", PPDIFFUSERS_FAST_CACHE=str(cache))
    ours_cmd = [sys.executable, str(REPO / "examples" / "flux_lightning" / "text_to_image_generation_flux_lightning.py"),
                "--pretrained_model_name_or_path", str(DEMO_MODEL), "--path_to_lora",
                str(DEMO_MODEL / "student_lora.safetensors"), "--prompt", "a handwritten digit 7", "--step", "4",
                "--height", "32", "--width", "32", "--max_sequence_length", "8", "--inference_optimize", "--output_dir", str(workdir / "cold_out")]
    torch_env = dict(os.environ, OMP_NUM_THREADS="1")
    torch_env.pop("PYTHONPATH", None)
    torch_cmd = [args.torch_python, __file__, "--worker", "torch_cold", "--workdir", str(workdir)]
    subprocess.run(ours_cmd, env=env, check=True, capture_output=True)  # exports and caches the predictor
    result = {"ours": {"cpu": [], "wall": []}, "torch": {"cpu": [], "wall": []}}
    for _ in range(rounds):
        for side, cmd, cmd_env in (("ours", ours_cmd, env), ("torch", torch_cmd, torch_env)):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            done = subprocess.run(cmd, env=cmd_env, capture_output=True, text=True)
            wall = 1000 * (time.perf_counter() - start)
            if done.returncode != 0:
                raise RuntimeError(f"{side} cold start failed:\n{done.stderr[-2000:]}")
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            result[side]["cpu"].append(1000 * (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime))
            result[side]["wall"].append(wall)
    return result


def torch_cold(args):
    import torch
    from diffusers import FluxPipeline

    torch.set_num_threads(1)
    side = TorchSide(args.workdir, "cpu")
    pipe = side._pipeline()
    image = pipe(num_inference_steps=4, height=32, width=32, max_sequence_length=8, **side.prompt_embeds()).images[0]
    image.save(Path(args.workdir) / "torch_cold.png")


def memory_worker(args, side_name):
    side = (OurSide if side_name == "ours" else TorchSide)(args.workdir, args.device)
    side.train_step("plain", 3)
    print(json.dumps({"max_rss_mb": max_rss_mb()}))


def peak_memory(args, workdir):
    out = {}
    for side in ("ours", "torch"):
        python = sys.executable if side == "ours" else args.torch_python
        env = dict(os.environ, OMP_NUM_THREADS="1")
        if side == "torch":
            env.pop("PYTHONPATH", None)
        done = subprocess.run([python, __file__, "--worker", f"{side}_memory", "--workdir", str(workdir), "--device",
                               args.device], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{side} memory run failed:\n{done.stderr[-2000:]}")
        out[side] = json.loads(done.stdout.strip().splitlines()[-1])["max_rss_mb"]
    return out


def machine_line():
    import paddle

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, Paddle {paddle.__version__}, "
            f"one math thread per process")


GPU_PROTOCOL = """## GPU

Not run here (this machine has no GPU and no Paddle GPU build). `python scripts/benchmark_vs_torch.py --device gpu`
prints the same table on a GPU, with our dygraph and `to_static` + CINN rows each against `torch.compile`
(the predictor rows are CPU only). FLUX.1-dev at 1024 x 1024, 4 steps, as in the article this project starts from
(A800: 2.21 s per image in dygraph, 1.66 s with CINN), in one command (bfloat16 weights on GPU by default; the
command line prints ms per image and per transformer call after the warm-up runs):

```bash
for mode in "" --use_cinn; do
  python examples/flux_lightning/text_to_image_generation_flux_lightning.py \\
    --pretrained_model_name_or_path /path/to/FLUX.1-dev --path_to_lora student.safetensors \\
    --prompt "a photo of a cat" --height 1024 --width 1024 --step 4 --benchmark --warmup 2 --repeats 5 $mode
done
```"""


def write_markdown(path, rows, op_rows, agreement, memory, machine, args, torch_versions):
    lines = ["# Performance against diffusers / PyTorch", "",
             f"Measured by `python scripts/benchmark_vs_torch.py{' --quick' if args.quick else ''}` (one run, "
             f"{args.device.upper()}): {machine}; PyTorch side {torch_versions}. The two processes take turns in "
             "interleaved rounds on the same random weights and inputs, so load from other jobs on the shared "
             "machine hits both; CPU time is the process's CPU time per call (median), wall time beside it.", "",
             "| work | ours (ms CPU) | diffusers / torch (ms CPU) | ratio | ours wall | torch wall | wall ratio |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['work']}{' (' + r['note'] + ')' if r['note'] else ''} | {r['ours_cpu']:.1f} | "
                     f"{r['torch_cpu']:.1f} | {r['ratio_cpu']:.2f}x | {r['ours_wall']:.1f} | {r['torch_wall']:.1f} | "
                     f"{r['ratio_wall']:.2f}x |")
    if op_rows:
        lines += ["", "## Single operators", "",
                  "Where the whole-model ratios come from: the same expression in both frameworks, one thread.", "",
                  "| operator | Paddle (ms CPU) | torch (ms CPU) | ratio |", "|---|---:|---:|---:|"]
        lines += [f"| {r['work']} | {r['ours_cpu']:.2f} | {r['torch_cpu']:.2f} | {r['ratio_cpu']:.2f}x |"
                  for r in op_rows]
    if memory:
        lines += ["", f"Peak memory (max RSS of a process doing the plain training step, imports included): ours "
                      f"{memory['ours']:.0f} MB, torch {memory['torch']:.0f} MB "
                      f"({memory['ours'] / memory['torch']:.2f}x)."]
    if agreement:
        lines += ["", "Output agreement (transformer forward, max |ours - diffusers|): " +
                  ", ".join(f"{k} {v:.1e}" for k, v in agreement.items()) + "."]
    lines += ["", GPU_PROTOCOL]
    Path(path).write_text("\n".join(lines) + "\n")


def main(argv=None):
    args = parse_args(argv)
    if args.worker == "torch":
        return torch_worker(args)
    if args.worker == "torch_cold":
        return torch_cold(args)
    if args.worker in ("ours_memory", "torch_memory"):
        return memory_worker(args, args.worker.split("_")[0])
    import numpy as np

    rounds = args.rounds or (3 if args.quick else 5)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    shapes = [(b, n) for n in ((64, 256) if args.quick else (64, 256, 1024)) for b in (1, 4)]
    modes = ["dygraph", "to_static", "predictor"] if args.device == "cpu" else ["dygraph", "to_static"]
    with tempfile.TemporaryDirectory(prefix="bench_vs_torch_") as tmp:
        workdir = Path(tmp)
        torch_side = TorchClient(args, workdir)
        try:
            torch_versions, rows, op_rows, agreement, memory = "", [], [], {}, None
            torch_side("create_model")
            ours = OurSide(workdir, args.device)
            if "forward" not in skip:
                for batch, tokens in shapes:
                    repeats = 1 if batch * tokens >= 4096 else 3
                    ours_out, torch_out = workdir / "ours.npy", workdir / "torch.npy"
                    ours.forward(batch, tokens, 0, "dygraph", save=str(ours_out))
                    torch_side("forward", batch=batch, image_tokens=tokens, repeats=0, save=str(torch_out))
                    agreement[f"{tokens} tokens x batch {batch}"] = float(np.abs(np.load(ours_out) -
                                                                                 np.load(torch_out)).max())
                    torch_mode = "eager" if args.device == "cpu" else "compile"
                    for mode in modes:
                        timing = interleave(rounds, lambda: ours.forward(batch, tokens, repeats, mode),
                                            lambda: torch_side("forward", batch=batch, image_tokens=tokens,
                                                               repeats=repeats, mode=torch_mode))
                        rows.append(row(f"forward {mode}, {tokens} + {TEXT_TOKENS} tokens, batch {batch}",
                                        timing["ours"], timing["torch"], f"torch {torch_mode}"))
            if "train" not in skip:
                for kind, label in (("plain", "LoRA training step, flow matching"),
                                    ("pcm", "PCM step (3 forwards + 1 backward)")):
                    timing = interleave(rounds, lambda: ours.train_step(kind, 1),
                                        lambda: torch_side("train_step", kind=kind, repeats=1))
                    rows.append(row(f"{label}, rank 16, batch 4, 256 + 64 tokens", timing["ours"], timing["torch"],
                                    "diffusers + peft"))
            if "generate" not in skip or "cold" not in skip:
                ours.export_student_for_diffusers("a handwritten digit 7")
            if "generate" not in skip:
                request = dict(prompt="a handwritten digit 7", images=16, steps=4, size=32)
                timing = interleave(rounds, lambda: ours.generate(1, **request),
                                    lambda: torch_side("generate", repeats=1, **request))
                rows.append(row("demo generation, 16 images x 4 steps (CLI default path)", timing["ours"],
                                timing["torch"], "LoRA fused on both sides; torch given the prompt embeddings"))
            if "cold" not in skip:
                timing = cold_start(args, workdir, max(2, rounds - 2))
                rows.append(row("cold start to the first demo image, cached predictor", timing["ours"],
                                timing["torch"], "fresh processes"))
            if "ops" not in skip:
                for name, description in SINGLE_OPS.items():
                    timing = interleave(rounds, lambda: ours.single_op(name, 3),
                                        lambda: torch_side("single_op", name=name, repeats=3))
                    op_rows.append(row(description, timing["ours"], timing["torch"]))
            if "memory" not in skip:
                memory = peak_memory(args, workdir)
                print(f"peak memory: ours {memory['ours']:.0f} MB, torch {memory['torch']:.0f} MB "
                      f"({memory['ours'] / memory['torch']:.2f}x)")
            print("output agreement:", {k: f"{v:.1e}" for k, v in agreement.items()})
        finally:
            torch_versions = subprocess.run(
                [args.torch_python, "-c", "import torch, diffusers, peft; print(f'torch {torch.__version__}, "
                 "diffusers {diffusers.__version__}, peft {peft.__version__}')"], capture_output=True,
                text=True).stdout.strip()
            torch_side.close()
            if args.output and rows:  # also after a failure: the rows measured so far
                write_markdown(args.output, rows, op_rows, agreement, memory, machine_line(), args, torch_versions)
                print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
