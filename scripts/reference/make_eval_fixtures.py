"""Reference fixtures for the evaluation tests, computed with PyTorch (run in the reference env):

    /work/venv-ref/bin/python scripts/reference/make_eval_fixtures.py

Writes tests/fixtures/evaluation/:
* ``inception_pool3.npz``: a few fixed uint8 images, the pool3 features [N, 2048] of a PyTorch InceptionV3
  FID network (written below from plain torch modules, following the pytorch-fid architecture) whose weights
  come from ``ppdiffusers_fast/evaluation/weight_recipe.py`` (seeded numpy; loaded by file path, so no Paddle),
  and that recipe's SHA-256 digest, so the Paddle test regenerates the same weights instead of storing 90 MB.
* ``torch_checkpoints/``: tiny ``.pth`` files (zip and legacy formats) and the arrays they hold, for the
  restricted unpickler.
* ``clip_tiny/``: a transformers ``CLIPModel`` with a tiny random config (Hugging Face layout: config.json,
  model.safetensors, tokenizer and image processor files); ``clip_embeddings.npz``: its processor outputs
  and image/text embeddings on fixed images and captions.
"""
import importlib.util
import json
import os
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "evaluation"
INCEPTION_SEED = 1234


def load_weight_recipe():
    path = ROOT / "ppdiffusers_fast" / "evaluation" / "weight_recipe.py"
    spec = importlib.util.spec_from_file_location("weight_recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- InceptionV3 (FID) in torch
class TorchBasicConv2d(nn.Module):
    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class TorchInceptionA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = TorchBasicConv2d(cin, 64, 1)
        self.branch5x5_1 = TorchBasicConv2d(cin, 48, 1)
        self.branch5x5_2 = TorchBasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = TorchBasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = TorchBasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = TorchBasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = TorchBasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(tf_avg_pool(x))
        return torch.cat([a, b, c, d], 1)


class TorchInceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = TorchBasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = TorchBasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = TorchBasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = TorchBasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([a, b, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class TorchInceptionC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = TorchBasicConv2d(cin, 192, 1)
        self.branch7x7_1 = TorchBasicConv2d(cin, c7, 1)
        self.branch7x7_2 = TorchBasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = TorchBasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = TorchBasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = TorchBasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = TorchBasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = TorchBasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = TorchBasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = TorchBasicConv2d(cin, 192, 1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = self.branch7x7dbl_1(x)
        c = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(c))))
        d = self.branch_pool(tf_avg_pool(x))
        return torch.cat([a, b, c, d], 1)


class TorchInceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = TorchBasicConv2d(cin, 192, 1)
        self.branch3x3_2 = TorchBasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = TorchBasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = TorchBasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = TorchBasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = TorchBasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([a, b, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class TorchInceptionE(nn.Module):
    def __init__(self, cin, use_max_pool):
        super().__init__()
        self.use_max_pool = use_max_pool
        self.branch1x1 = TorchBasicConv2d(cin, 320, 1)
        self.branch3x3_1 = TorchBasicConv2d(cin, 384, 1)
        self.branch3x3_2a = TorchBasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = TorchBasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = TorchBasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = TorchBasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = TorchBasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = TorchBasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = TorchBasicConv2d(cin, 192, 1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], 1)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.use_max_pool else tf_avg_pool(x)
        return torch.cat([a, b, c, self.branch_pool(pooled)], 1)


class TorchInceptionV3FID(nn.Module):
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = TorchBasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = TorchBasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = TorchBasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = TorchBasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = TorchBasicConv2d(80, 192, 3)
        self.Mixed_5b = TorchInceptionA(192, 32)
        self.Mixed_5c = TorchInceptionA(256, 64)
        self.Mixed_5d = TorchInceptionA(288, 64)
        self.Mixed_6a = TorchInceptionB(288)
        self.Mixed_6b = TorchInceptionC(768, 128)
        self.Mixed_6c = TorchInceptionC(768, 160)
        self.Mixed_6d = TorchInceptionC(768, 160)
        self.Mixed_6e = TorchInceptionC(768, 192)
        self.Mixed_7a = TorchInceptionD(768)
        self.Mixed_7b = TorchInceptionE(1280, use_max_pool=False)
        self.Mixed_7c = TorchInceptionE(2048, use_max_pool=True)

    def forward(self, images01):
        x = F.interpolate(images01, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                     "Mixed_7a", "Mixed_7b", "Mixed_7c"]:
            x = getattr(self, name)(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def synthetic_image(height, width, phase):
    """Smooth deterministic RGB uint8 image (compresses well, exercises every channel)."""
    y, x = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    r = 0.5 + 0.5 * np.sin(2 * np.pi * (x * (1 + phase) + y * 0.5))
    g = 0.5 + 0.5 * np.cos(2 * np.pi * (y * (2 - phase) - x * 0.3))
    b = ((x - 0.3 - 0.2 * phase) ** 2 + (y - 0.6) ** 2 < 0.08).astype(np.float64) * 0.8 + 0.1 * x
    return np.round(np.stack([r, g, b], axis=-1) * 255).clip(0, 255).astype(np.uint8)


def make_inception_fixture():
    recipe = load_weight_recipe()
    model = TorchInceptionV3FID().eval()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    weights = recipe.random_state_dict(shapes, seed=INCEPTION_SEED)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
    images = [synthetic_image(64, 80, 0.0), synthetic_image(299, 299, 0.5), synthetic_image(150, 113, 1.0)]
    features = []
    with torch.no_grad():
        for image in images:
            tensor = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
            features.append(model(tensor)[0].numpy())
    arrays = {f"image_{i}": image for i, image in enumerate(images)}
    np.savez_compressed(OUT / "inception_pool3.npz", features=np.stack(features).astype(np.float32),
                        weight_seed=np.int64(INCEPTION_SEED), weight_digest=np.array(recipe.state_dict_digest(weights)),
                        num_images=np.int64(len(images)), **arrays)
    print("inception pool3 features", np.stack(features).shape, "mean", np.mean(features))


def make_torch_checkpoint_fixture():
    folder = OUT / "torch_checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7.0
    state = OrderedDict([
        ("layer.conv.weight", torch.linspace(-1, 1, 24).reshape(2, 3, 2, 2)),
        ("layer.bn.running_var", torch.tensor([0.5, 2.0], dtype=torch.float64)),
        ("layer.bn.num_batches_tracked", torch.tensor(7)),
        ("transposed", base.t()),  # non-contiguous view: strides must be honoured
        ("half", torch.tensor([1.5, -2.25], dtype=torch.float16)),
        ("bf16", torch.tensor([0.5, 3.0, -1.0], dtype=torch.bfloat16)),
        ("shared_view", base[1]),  # a view into the same storage at an offset
    ])
    torch.save(state, folder / "tiny_zip.pth")
    torch.save(state, folder / "tiny_legacy.pth", _use_new_zipfile_serialization=False)
    np.savez(folder / "tiny_expected.npz", **{k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
                                             for k, v in state.items()})


# ----------------------------------------------------------------------------- CLIP
def bytes_to_unicode():
    """GPT-2 / CLIP byte -> printable unicode character table."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, [chr(c) for c in codes]))


def write_tiny_clip_tokenizer(folder):
    characters = list(bytes_to_unicode().values())
    merges = ["t h", "th e</w>", "a n", "an d</w>", "c a", "ca t</w>", "d o", "do g</w>", "o n</w>", "i n</w>",
              "r e", "e d</w>", "s t", "p h", "ph o", "pho t", "phot o</w>"]
    vocab = characters + [c + "</w>" for c in characters]
    vocab += ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


def make_clip_fixture():
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder = OUT / "clip_tiny"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    vocab_size = write_tiny_clip_tokenizer(folder)
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    tokenizer.save_pretrained(folder)
    processor = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    processor.save_pretrained(folder)
    torch.manual_seed(0)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    bos = tokenizer.convert_tokens_to_ids("<|startoftext|>")
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, projection_dim=16,
                         eos_token_id=eos, bos_token_id=bos, pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=64, patch_size=16, projection_dim=16),
        projection_dim=16)
    model = CLIPModel(config).eval()
    # Non-trivial projections and layer norms (the default init leaves LayerNorm at 1/0).
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "layer_norm" in name or "layrnorm" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    model.save_pretrained(folder, safe_serialization=True)
    for path in folder.iterdir():
        path.chmod(0o644)  # transformers writes model.safetensors as 0600
    images = [synthetic_image(96, 128, 0.2), synthetic_image(64, 64, 0.7), synthetic_image(150, 80, 0.9)]
    captions = ["a photo of the cat", "The dog and the cat on a red mat", "a stop sign in the snow, at night"]
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    tokens = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        image_embeds = model.get_image_features(pixel_values=pixel_values)
        text_embeds = model.get_text_features(input_ids=tokens["input_ids"])
    arrays = {f"image_{i}": image for i, image in enumerate(images)}
    np.savez_compressed(
        OUT / "clip_embeddings.npz", pixel_values=pixel_values.numpy(), input_ids=tokens["input_ids"].numpy(),
        image_embeds=image_embeds.numpy(), text_embeds=text_embeds.numpy(), captions=np.array(captions),
        num_images=np.int64(len(images)), **arrays)
    print("clip image embeds", tuple(image_embeds.shape), "text embeds", tuple(text_embeds.shape))


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    make_inception_fixture()
    make_torch_checkpoint_fixture()
    make_clip_fixture()
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"fixtures in {OUT}: {total / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
