"""InceptionV3 FID network: pool3 parity with a PyTorch reference, strict weight loading, weight conversion."""
import os
import pickle

import numpy as np
import paddle
import pytest

from ppdiffusers_fast.evaluation.features import InceptionFeatureExtractor
from ppdiffusers_fast.evaluation.inception import (
    InceptionV3FID,
    load_inception_weights,
    load_reference_state_dict,
    reference_shapes,
)
from ppdiffusers_fast.evaluation.inception_convert import canonical_key, convert_inception_weights, read_checkpoint
from ppdiffusers_fast.evaluation.restricted_pickle import load_paddle_checkpoint, load_torch_checkpoint
from ppdiffusers_fast.evaluation.weight_recipe import random_state_dict, state_dict_digest


@pytest.fixture(scope="module")
def parity_fixture():
    path = os.path.join(os.path.dirname(__file__), "..", "fixtures", "evaluation", "inception_pool3.npz")
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def random_weights(parity_fixture):
    # Same recipe and seed as scripts/reference/make_eval_fixtures.py (no 90 MB weight fixture).
    return random_state_dict(reference_shapes(), seed=int(parity_fixture["weight_seed"]))


@pytest.fixture(scope="module")
def random_model(random_weights):
    return load_reference_state_dict(InceptionV3FID(), random_weights)


def test_recipe_reproduces_the_reference_weights(random_weights, parity_fixture):
    assert len(random_weights) == 470
    assert state_dict_digest(random_weights) == str(parity_fixture["weight_digest"])


def test_pool3_matches_pytorch_reference(random_model, parity_fixture):
    expected = parity_fixture["features"]
    for i in range(int(parity_fixture["num_images"])):
        image = parity_fixture[f"image_{i}"]  # sizes 64x80, 299x299, 150x113: resize path and identity path
        pixels = paddle.to_tensor(image.transpose(2, 0, 1)[None].astype("float32") / 255.0)
        with paddle.no_grad():
            features = random_model(pixels).numpy()[0]
        assert features.shape == (2048,)
        np.testing.assert_allclose(features, expected[i], rtol=0, atol=1e-4)


def test_extractor_batches_mixed_sizes(random_model, parity_fixture):
    extractor = InceptionFeatureExtractor(random_model)
    images = [parity_fixture[f"image_{i}"] for i in range(int(parity_fixture["num_images"]))]
    features = extractor(images)
    assert features.dtype == np.float64 and features.shape == (len(images), 2048)
    np.testing.assert_allclose(features, parity_fixture["features"], rtol=0, atol=1e-4)


def test_weight_loading_is_strict(random_weights):
    model = InceptionV3FID()
    missing = dict(random_weights)
    missing.pop("Mixed_7c.branch_pool.bn.running_var")
    with pytest.raises(KeyError, match="missing 1 .*Mixed_7c.branch_pool.bn.running_var"):
        load_reference_state_dict(model, missing)
    unexpected = dict(random_weights, **{"Mixed_8a.conv.weight": np.zeros(3, np.float32)})
    with pytest.raises(KeyError, match="unexpected 1 .*Mixed_8a"):
        load_reference_state_dict(model, unexpected)
    mismatched = dict(random_weights, **{"Conv2d_1a_3x3.conv.weight": np.zeros((32, 3, 5, 5), np.float32)})
    with pytest.raises(KeyError, match="Conv2d_1a_3x3.conv.weight: file"):
        load_reference_state_dict(model, mismatched)
    with_classifier = dict(random_weights, **{"fc.weight": np.zeros((1008, 2048), np.float32),
                                               "Conv2d_1a_3x3.bn.num_batches_tracked": np.array(3)})
    load_reference_state_dict(model, with_classifier)  # the unused published keys are ignored


def test_pickle_needs_explicit_trust(tmp_path):
    path = tmp_path / "weights.pdparams"
    paddle.save({"a": paddle.ones([2])}, str(path))
    with pytest.raises(PermissionError, match="--trust_pickle"):
        read_checkpoint(path)
    assert set(read_checkpoint(path, trust_pickle=True)) == {"a"}


class _Exploit:
    def __reduce__(self):
        return (os.getcwd, ())


def test_restricted_unpickler_refuses_other_globals(tmp_path):
    path = tmp_path / "evil.pdparams"
    path.write_bytes(pickle.dumps({"a": _Exploit()}))
    with pytest.raises(pickle.UnpicklingError, match="getcwd.* is not allowed"):
        load_paddle_checkpoint(str(path))
    object_array = tmp_path / "objects.pdparams"
    object_array.write_bytes(pickle.dumps({"a": np.array([1, "x"], dtype=object)}))
    with pytest.raises(pickle.UnpicklingError, match="object dtype"):
        load_paddle_checkpoint(str(object_array))


@pytest.mark.parametrize("name", ["tiny_zip.pth", "tiny_legacy.pth"])
def test_torch_checkpoints_read_without_torch(fixtures_dir, name):
    folder = fixtures_dir / "evaluation" / "torch_checkpoints"
    state = load_torch_checkpoint(str(folder / name))
    with np.load(folder / "tiny_expected.npz") as expected:
        assert set(state) == set(expected.files)
        for key in expected.files:
            assert state[key].shape == expected[key].shape, key
            np.testing.assert_array_equal(state[key].astype(np.float64), expected[key].astype(np.float64), err_msg=key)
    assert state["layer.bn.running_var"].dtype == np.float64 and state["half"].dtype == np.float16


def test_convert_reports_a_wrong_architecture(fixtures_dir, tmp_path):
    source = fixtures_dir / "evaluation" / "torch_checkpoints" / "tiny_zip.pth"
    with pytest.raises(KeyError, match="missing 470"):
        convert_inception_weights(source, tmp_path / "out.safetensors", trust_pickle=True)
    assert not (tmp_path / "out.safetensors").exists()


def test_convert_paddlemix_layout(random_weights, tmp_path):
    # PaddleMIX saves the paddle.vision InceptionV3 layout (inception_stem.*, inception_block_list.N.*, fc).
    vision = paddle.vision.models.inception_v3(num_classes=1008, with_pool=True, pretrained=False)
    state = {}
    for key, value in vision.state_dict().items():
        canonical = canonical_key(key)
        state[key] = random_weights[canonical] if canonical in random_weights else value.numpy()
        assert canonical in random_weights or key.startswith("fc."), key
        assert tuple(value.shape) == state[key].shape, key
    source = tmp_path / "pp_inception.pdparams"
    paddle.save(state, str(source))
    destination = tmp_path / "inception.safetensors"
    report = convert_inception_weights(source, destination, trust_pickle=True)
    assert report["num_tensors"] == 470 and report["dropped_keys"] == ["fc.bias", "fc.weight"]
    assert report["recognized"] == ""
    converted = read_checkpoint(destination)
    assert state_dict_digest(converted) == state_dict_digest(random_weights)
    model = load_inception_weights(destination)
    assert np.array_equal(model.Mixed_6a.branch3x3.bn._variance.numpy(),
                          random_weights["Mixed_6a.branch3x3.bn.running_var"])
    with pytest.raises(ValueError, match="safetensors"):
        load_inception_weights(source)
