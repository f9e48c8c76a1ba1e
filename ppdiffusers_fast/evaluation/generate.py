"""Generation for evaluation: one image per prompt, per-prompt seeds, resumable, batched.

Prompt ``i`` (its index in the saved prompt list) is generated with seed ``base_seed + i`` and written to
``{output_dir}/{i:05d}.png`` (atomically: a hidden temporary file renamed into place), so an interrupted run
resumes by skipping the files that exist, and a batch composition never changes an image.

``generate_fn(prompts: list[str], seeds: list[int]) -> list of images`` (PIL or uint8 [H, W, 3]) is all this
module needs; :func:`pipeline_generate_fn` adapts a ``FluxPipeline``.

A ``generation.json`` manifest beside the images records the settings (model and weight hashes, steps,
guidance, resolution, prompt-list SHA-256, seed rule). Resuming into a folder whose manifest differs raises,
so a cache never mixes images made with different settings.
"""
import json
import os
import tempfile

from PIL import Image

from .image_folder import to_rgb_uint8

MANIFEST_NAME = "generation.json"
SEED_RULE = "seed_i = base_seed + i (i = index in the prompt list)"


def image_filename(index):
    return f"{index:05d}.png"


def per_prompt_seed(index, base_seed=0):
    """Seed of prompt ``index``: ``base_seed + index``."""
    return int(base_seed) + int(index)


def _write_json_atomic(path, payload):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1, sort_keys=True)
    os.replace(tmp, path)


def check_or_write_manifest(output_dir, manifest):
    """Write ``manifest`` to ``output_dir/generation.json``, or check it equals the one there.

    Raises ``ValueError`` listing the differing keys when the folder was made with other settings.
    """
    path = os.path.join(output_dir, MANIFEST_NAME)
    manifest = json.loads(json.dumps(manifest, sort_keys=True))  # normalise tuples, key order
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            existing = json.load(handle)
        keys = sorted(set(existing) | set(manifest))
        differing = {k: (existing.get(k), manifest.get(k)) for k in keys if existing.get(k) != manifest.get(k)}
        if differing:
            raise ValueError(f"{output_dir} holds images made with other settings {differing} (saved, requested); "
                             "use another output folder or delete it")
        return
    _write_json_atomic(path, manifest)


def _save_png_atomic(image, path):
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".", suffix=".png.tmp")
    os.close(fd)
    try:
        Image.fromarray(to_rgb_uint8(image)).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def missing_indices(output_dir, num_prompts):
    """Indices in ``range(num_prompts)`` whose image file does not exist yet."""
    return [i for i in range(num_prompts) if not os.path.isfile(os.path.join(output_dir, image_filename(i)))]


def generate_images(generate_fn, prompts, output_dir, base_seed=0, batch_size=4, manifest=None, image_size=None,
                    show_progress=True, description="generate"):
    """Generate the missing images of ``prompts`` into ``output_dir``.

    Args:
        generate_fn: ``(prompts, seeds) -> images``, or a zero-argument factory of one when
            wrapped by :class:`LazyGenerateFn` (only built if something is missing).
        prompts: list of str, in prompt-list order.
        manifest: dict of settings written / checked as ``generation.json`` (see module docstring).
        image_size: optional ``(height, width)`` every image must have.
    Returns:
        ``{"generated": n, "skipped": n, "output_dir": ...}``.
    """
    from tqdm import tqdm

    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    os.makedirs(output_dir, exist_ok=True)
    full_manifest = dict(manifest or {})
    full_manifest.update({"num_prompts": len(prompts), "base_seed": int(base_seed), "seed_rule": SEED_RULE})
    check_or_write_manifest(output_dir, full_manifest)
    todo = missing_indices(output_dir, len(prompts))
    progress = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc=description, unit="img",
                    disable=not show_progress)
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        seeds = [per_prompt_seed(i, base_seed) for i in batch]
        images = generate_fn([prompts[i] for i in batch], seeds)
        if images is None or len(images) != len(batch):
            got = "None" if images is None else len(images)
            raise ValueError(f"generate_fn returned {got} images for {len(batch)} prompts")
        for index, image in zip(batch, images):
            array = to_rgb_uint8(image)
            if image_size is not None and tuple(array.shape[:2]) != tuple(image_size):
                raise ValueError(f"prompt {index}: image is {array.shape[0]}x{array.shape[1]}, "
                                 f"expected {image_size[0]}x{image_size[1]}")
            _save_png_atomic(array, os.path.join(output_dir, image_filename(index)))
        progress.update(len(batch))
    progress.close()
    return {"generated": len(todo), "skipped": len(prompts) - len(todo), "output_dir": output_dir}


class LazyGenerateFn:
    """Builds the real ``generate_fn`` on first call (so a finished cache never loads the model)."""

    def __init__(self, factory):
        self._factory = factory
        self._fn = None

    @property
    def built(self):
        return self._fn is not None

    def __call__(self, prompts, seeds):
        if self._fn is None:
            self._fn = self._factory()
        return self._fn(prompts, seeds)


def pipeline_generate_fn(pipe, height, width, num_inference_steps, guidance_scale, sigmas=None):
    """``generate_fn`` over a ``FluxPipeline``: one seed per prompt, PIL output."""

    def generate(prompts, seeds):
        output = pipe(prompt=list(prompts), height=height, width=width, num_inference_steps=num_inference_steps,
                      guidance_scale=guidance_scale, sigmas=sigmas, seed=list(seeds), output_type="pil")
        return list(output.images)

    return generate
