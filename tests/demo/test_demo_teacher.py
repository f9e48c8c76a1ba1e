"""The committed demo teacher folder (examples/flux_lightning/demo_model): loadable, accurate, on prompt.

Checks, against the figures the training run stated in demo_config.json / train_log.txt:
- the digit classifier's accuracy on the held-out test split (recomputed from scikit-learn's digits);
- the teacher's 50-step adherence on the small fixed batch of the training log;
- the transformer loads with ``load_flux_transformer`` from PyTorch-layout safetensors;
- ``FluxPipeline.from_pretrained`` reads the folder unchanged and gives the teacher's image.
"""
import json

import numpy as np
import pytest

from demo.classifier import accuracy, load_classifier
from demo.config import (CLASSIFIER_WEIGHTS_NAME, DEMO_MODEL_DIR, DemoSplit, all_prompts,
                                          digit_prompt)
from demo.data import load_split
from demo.metrics import adherence, eval_labels_and_seeds
from demo.teacher import DemoTeacher, read_demo_config
from demo.train_teacher import TEST_BATCH
from ppdiffusers_fast.models import safetensors_io
from ppdiffusers_fast.models.weights import load_flux_transformer

pytestmark = pytest.mark.skipif(not (DEMO_MODEL_DIR / "demo_config.json").is_file(),
                                reason=f"no demo model folder at {DEMO_MODEL_DIR}")


@pytest.fixture(scope="module")
def demo():
    return read_demo_config(DEMO_MODEL_DIR)


@pytest.fixture(scope="module")
def teacher():
    return DemoTeacher.from_folder(DEMO_MODEL_DIR)


@pytest.fixture(scope="module")
def classifier(demo):
    return load_classifier(DEMO_MODEL_DIR / CLASSIFIER_WEIGHTS_NAME, demo["classifier"]["resolution"])


def test_classifier_accuracy_is_the_stated_one(demo, classifier):
    split = load_split(demo["resolution"], DemoSplit(**demo["split"]))
    test = split["classifier_test"]
    assert len(test) == demo["classifier"]["num_test_images"]
    measured = accuracy(classifier, test.images, test.labels)
    stated = demo["classifier"]["test_accuracy"]
    assert abs(measured - stated) <= 1.0 / len(test) + 1e-9  # at most one image may flip across CPUs
    assert measured > 0.9


def test_split_is_disjoint_and_fixed(demo):
    from demo.data import split_indices

    parts = split_indices(1797, DemoSplit(**demo["split"]))
    assert sum(len(v) for v in parts.values()) == len(set(np.concatenate(list(parts.values())).tolist()))
    again = split_indices(1797, DemoSplit(**demo["split"]))
    assert all(np.array_equal(parts[k], again[k]) for k in parts)


def test_prompt_embeddings_are_distinct(teacher):
    assert teacher.prompts.pooled.shape[0] == len(all_prompts()) == 11
    pooled = teacher.prompts.pooled.numpy().astype(np.float64)
    sequence = teacher.prompts.sequence.numpy().reshape(11, -1).astype(np.float64)
    for x in (pooled, sequence):
        distances = np.linalg.norm(x[:, None] - x[None], axis=-1)
        assert distances[~np.eye(11, dtype=bool)].min() > 1e-2


def test_teacher_50_step_adherence_on_the_fixed_batch(demo, teacher, classifier):
    stated = demo["teacher_metrics"]["test_batch"]
    assert stated["images_per_digit"] == TEST_BATCH["images_per_digit"]
    labels, seeds = eval_labels_and_seeds(TEST_BATCH["images_per_digit"], TEST_BATCH["first_seed"])
    images = teacher.generate(labels, seeds, TEST_BATCH["num_steps"])
    assert images.shape == (20, 3, demo["resolution"], demo["resolution"])
    measured = adherence(classifier, images, labels)
    assert measured >= 0.9  # the run measured stated["adherence"] (see train_log.txt)
    assert measured >= stated["adherence"] - 0.05 - 1e-9  # one image of 20 may flip across CPUs


def test_transformer_folder_is_pytorch_layout_and_loads(demo):
    folder = DEMO_MODEL_DIR / "transformer"
    config = json.loads((folder / "config.json").read_text())
    assert config["guidance_embeds"] is False and config["in_channels"] == 64
    header, metadata, _ = safetensors_io.read_header(folder / "diffusion_pytorch_model.safetensors")
    assert metadata.get("layout") != "paddle"
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    assert header["x_embedder.weight"]["shape"] == [inner, 64]  # torch.nn.Linear: [out, in]
    model = load_flux_transformer(folder)
    assert list(model.x_embedder.weight.shape) == [64, inner]  # paddle.nn.Linear: [in, out]
    stored = safetensors_io.load_file(folder / "diffusion_pytorch_model.safetensors")
    np.testing.assert_array_equal(model.x_embedder.weight.numpy(), stored["x_embedder.weight"].T)
    assert sum(int(np.prod(p.shape)) for p in model.parameters()) < 5_000_000


def test_flux_pipeline_reads_the_folder_and_matches_the_teacher(demo, teacher):
    from ppdiffusers_fast.pipelines.pipeline_flux import FluxPipeline

    pipe = FluxPipeline.from_pretrained(DEMO_MODEL_DIR)
    pipe.set_progress_bar_config(disable=True)
    size = demo["resolution"]
    out = pipe(digit_prompt(3), negative_prompt=demo["negative_prompt"], true_cfg_scale=demo["guidance_scale"],
               height=size, width=size, num_inference_steps=4, seed=11,
               max_sequence_length=demo["max_sequence_length"], output_type="np")
    ours = teacher.generate([3], [11], num_steps=4)  # [1, 3, H, W] in [-1, 1]
    np.testing.assert_allclose(out.images[0], ours[0].transpose(1, 2, 0) / 2 + 0.5, atol=1e-4)


def test_tokenizers_split_prompts_into_words(teacher):
    clip_tokenizer, t5_tokenizer = teacher.tokenizers
    ids = clip_tokenizer(digit_prompt(7))["input_ids"]
    assert clip_tokenizer.convert_ids_to_tokens(ids) == ["<|startoftext|>", "a</w>", "handwritten</w>", "digit</w>",
                                                         "seven</w>", "<|endoftext|>"]
    assert ids[-1] == max(clip_tokenizer.get_vocab().values())  # CLIP pools at argmax(ids) = end of text
    pieces = t5_tokenizer.convert_ids_to_tokens(t5_tokenizer(digit_prompt(7))["input_ids"])
    assert pieces == ["\u2581a", "\u2581handwritten", "\u2581digit", "\u2581seven", "</s>"]


def test_upscaled_digits_map_ink_to_minus_one():
    from demo.data import upscale_digits

    digits = np.stack([np.zeros([8, 8]), np.full([8, 8], 16.0), np.full([8, 8], 4.0)])
    images = upscale_digits(digits, 32)
    assert images.shape == (3, 3, 32, 32)
    np.testing.assert_allclose(images[0], 1.0, atol=1e-6)  # blank paper
    np.testing.assert_allclose(images[1], -1.0, atol=1e-6)  # full ink
    np.testing.assert_allclose(images[2], 1.0 - 2.0 * 4.0 / 16.0, atol=1e-5)  # constant stays constant
