"""COCO-10k prompt selection: determinism, one caption per image, SHA-256, reuse, invalid files."""
import hashlib
import json
import os

import numpy as np
import pytest

from ppdiffusers_fast.evaluation.coco import (
    PromptFileError,
    load_prompt_list,
    prepare_prompts,
    prompts_sha256,
    read_caption_groups,
    select_prompts,
)


def write_coco_json(path, num_images=30, captions_per_image=5):
    images = [{"id": 1000 + 7 * i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in range(num_images)]
    annotations = []
    for i, image in enumerate(images):
        for j in range(captions_per_image):
            annotations.append({"image_id": image["id"], "id": 50000 + 10 * i + j,
                                "caption": f"  Image {i} caption {j}\nwith  spaces "})
    annotations.reverse()  # file order must not matter
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return images


def test_selection_follows_the_documented_procedure(tmp_path):
    path = tmp_path / "captions_val2014.json"
    images = write_coco_json(path)
    groups = read_caption_groups(path)
    chosen = select_prompts(groups, num_prompts=10, seed=7)
    # The procedure by hand: images sorted by id, 10 drawn without replacement (sorted), one caption each.
    rng = np.random.default_rng(7)
    image_ids = sorted(image["id"] for image in images)
    picked = np.sort(rng.choice(len(image_ids), size=10, replace=False))
    expected = []
    for i in picked:  # image i has id 1000 + 7 i, so sorted position == i
        j = int(rng.integers(5))
        expected.append((image_ids[i], 50000 + 10 * i + j, f"Image {i} caption {j} with spaces"))
    assert list(zip(chosen.image_ids, chosen.caption_ids, chosen.prompts)) == expected
    assert len(set(chosen.image_ids)) == 10
    assert select_prompts(groups, 10, seed=7).prompts == chosen.prompts
    assert select_prompts(groups, 10, seed=8).prompts != chosen.prompts


def test_sha256_is_of_the_compact_json_prompt_array():
    prompts = ["a cat", "un café ☕"]
    payload = json.dumps(prompts, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    assert prompts_sha256(prompts) == hashlib.sha256(payload).hexdigest()


def test_prepare_saves_then_reuses(tmp_path):
    captions = tmp_path / "captions_val2017.json"
    write_coco_json(captions)
    list_path = tmp_path / "out" / "prompts.json"
    first = prepare_prompts(list_path, captions, num_prompts=12, seed=0)
    saved = json.loads(list_path.read_text())
    assert saved["sha256"] == first.sha256 and saved["num_prompts"] == 12
    assert saved["source_sha256"] == hashlib.sha256(captions.read_bytes()).hexdigest()
    modified = os.path.getmtime(list_path)
    again = prepare_prompts(list_path, captions, num_prompts=12, seed=0)
    assert again.prompts == first.prompts and os.path.getmtime(list_path) == modified
    assert prepare_prompts(list_path).prompts == first.prompts  # reuse without the captions file
    with pytest.raises(ValueError, match="other settings.*seed"):
        prepare_prompts(list_path, captions, num_prompts=12, seed=1)
    saved["items"][0]["prompt"] = "edited"
    list_path.write_text(json.dumps(saved))
    with pytest.raises(PromptFileError, match="SHA-256"):
        load_prompt_list(list_path)


@pytest.mark.parametrize("content, message", [
    ('{"images": []}', "needs a top-level 'annotations' list"),
    ('{"annotations": [{"image_id": 1, "caption": "a"}, {"image_id": 2}]}', r"annotations\[1\] lacks keys \['caption'\]"),
    ('{"annotations": [{"caption": "a"}]}', r"annotations\[0\] lacks keys \['image_id'\]"),
    ('{"annotations": [{"image_id": 1, "caption": "   "}]}', r"annotations\[0\] has an empty"),
    ('{"annotations": [\n{"image_id": 1,, "caption": "a"}]}', "invalid JSON at line 2"),
])
def test_invalid_json_is_reported(tmp_path, content, message):
    path = tmp_path / "captions.json"
    path.write_text(content)
    with pytest.raises(PromptFileError, match=message):
        read_caption_groups(path)


def test_tsv_groups_by_image_and_reports_lines(tmp_path):
    good = tmp_path / "prompts.tsv"
    good.write_text("image_id\tcaption\n7\ta red bus\n7\ta bus on a street\n9\ttwo dogs\n\n")
    groups = read_caption_groups(good)
    assert groups == {"7": [(2, "a red bus"), (3, "a bus on a street")], "9": [(4, "two dogs")]}
    cases = {
        "image_id\tcaption\n1\ta\n2\tb\textra\n": "line 3: expected 2 tab-separated fields, got 3",
        "image_id\tcaption\n1\ta\n2\t  \n": "line 3: empty caption",
        "id\ttext_en\n1\ta\n": "line 1: the header needs a 'caption' or 'prompt' column",
        "prompt\na\n\nb\n": "line 3: empty line",
    }
    for content, message in cases.items():
        bad = tmp_path / "bad.tsv"
        bad.write_text(content)
        with pytest.raises(PromptFileError, match=message):
            read_caption_groups(bad)


def test_txt_prompts_and_errors(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\na dog\n\n")
    assert read_caption_groups(path) == {1: [(1, "a cat")], 2: [(2, "a dog")]}
    with pytest.raises(PromptFileError, match="3 prompts requested but only 2"):
        select_prompts(read_caption_groups(path), 3, seed=0, source="prompts.txt")
    path.write_text("a cat\n\na dog\n")
    with pytest.raises(PromptFileError, match="line 2: empty line"):
        read_caption_groups(path)
    path.write_bytes(b"a cat\n\xff\xfe\n")
    with pytest.raises(PromptFileError, match="not valid UTF-8"):
        read_caption_groups(path)
    with pytest.raises(PromptFileError, match="unsupported captions file type"):
        (tmp_path / "prompts.csv").write_text("a")
        read_caption_groups(tmp_path / "prompts.csv")
