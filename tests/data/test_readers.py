"""Readers for the three layouts with every kind of bad record, the cap, the sampler and resume."""
import base64
import io
import logging
import tarfile

import numpy as np
import pytest
from PIL import Image

from ppdiffusers_fast.data import (AspectRatioBuckets, Base64LineReader, ImageCaptionDataset, ImageFolderReader,
                                   ResumableDistributedBatchSampler, RobustDataLoader, TarShardReader,
                                   TarShardStream, TooManyBadRecordsError, TrainTransform,
                                   build_image_caption_loader, resize_and_crop, to_normalized_array)
from ppdiffusers_fast.data.bad_records import BadRecordCounter


def image_bytes(width=40, height=32, fmt="JPEG", seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


TRUNCATED_JPEG = image_bytes(64, 64)[:300]
GARBAGE = b"this is not an image at all"


def b64(data):
    return base64.b64encode(data)


def run_loader(loader):
    """All good captions and indices of one pass."""
    captions, indices = [], []
    for batch in loader:
        captions += batch["captions"]
        indices += batch["indices"].numpy().tolist()
    return captions, indices


# ---------------------------------------------------------------- layout (a): base64 lines + file list
def write_base64_dataset(root):
    good_jpeg, good_png, small = image_bytes(), image_bytes(fmt="PNG", seed=1), image_bytes(16, 16)
    part0 = [
        b"id0\t{'caption': 'a dog', 'url': 'http://x'}\t" + b64(good_jpeg),
        b'id1\t{"caption": "a cat", "similarity": 0.3}\t' + b64(good_png),
        b"id2\t{'caption': 'only two fields'}",                                 # wrong_field_count
        b"id3\t{'caption': 'bad \xff\xfe bytes'}\t" + b64(good_jpeg),           # non_utf8_caption
        b"id4\t{'caption': 'garbage image'}\t" + b64(GARBAGE),                  # undecodable_image
        b"id5\t{'caption': 'truncated image'}\t" + b64(TRUNCATED_JPEG),         # undecodable_image
        b"id6\t{'caption': 'not base64'}\t!!!!not-base64!!!!",                  # undecodable_image
        b"id7\t{'caption': 'tiny'}\t" + b64(small),                             # image_too_small
        b"id8\t{'url': 'no caption key'}\t" + b64(good_jpeg),                   # bad_caption
        b"id9\t{'caption': __import__('os').getcwd()}\t" + b64(good_jpeg),      # bad_caption, never run
        b"",                                                                    # blank: not a record
        b"id10\tplain text caption\t" + b64(good_jpeg),
        b"id11\t{'caption': 'x'}\t" + b64(good_jpeg) + b"\textra",              # wrong_field_count
    ]
    (root / "part0.txt").write_bytes(b"\n".join(part0) + b"\n")
    (root / "sub").mkdir()
    (root / "sub" / "part1.txt").write_bytes(b"id12\t{'caption': 'a red car'}\t" + b64(good_jpeg) + b"\n")
    (root / "files.list").write_text("# shards\npart0.txt\nmissing_part.txt\n\nsub/part1.txt\n")
    return root / "files.list"


EXPECTED_A = {"wrong_field_count": 2, "non_utf8_caption": 1, "undecodable_image": 3, "image_too_small": 1,
              "bad_caption": 2, "missing_file": 1}
GOOD_A = ["a dog", "a cat", "plain text caption", "a red car"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_base64_lines_every_bad_record_counted(tmp_path, caplog, num_workers):
    file_list = write_base64_dataset(tmp_path)
    reader = Base64LineReader(file_list)
    assert len(reader) == 13  # the blank line is not a record; the missing file is an index error
    assert [e.reason for e in reader.index_errors] == ["missing_file"]
    transform = TrainTransform(resolution=(16, 24))
    loader = build_image_caption_loader(reader, transform, batch_size=1, num_workers=num_workers, seed=1,
                                        num_replicas=1, rank=0, min_width=32, min_height=32,
                                        max_bad_fraction=1.0)
    with caplog.at_level(logging.WARNING, logger="ppdiffusers_fast.data.bad_records"):
        captions, indices = run_loader(loader)
    assert sorted(captions) == sorted(GOOD_A)
    assert dict(loader.counter.bad_by_reason) == EXPECTED_A
    assert loader.counter.num_good == 4
    # each bad record logged with file:line
    assert any("part0.txt:3" in r.message and "wrong_field_count" in r.message for r in caplog.records)
    assert any("part0.txt:4" in r.message and "non_utf8_caption" in r.message for r in caplog.records)
    assert any("part0.txt:13" in r.message for r in caplog.records)  # line numbers count blank lines
    assert any("missing_part.txt" in r.message and "missing_file" in r.message for r in caplog.records)


def test_base64_lines_pixels_and_caption_parsing(tmp_path):
    reader = Base64LineReader(write_base64_dataset(tmp_path))
    dataset = ImageCaptionDataset(reader, TrainTransform(resolution=(32, 40)))
    item = dataset[0]
    assert item["caption"] == "a dog"
    expected = np.asarray(Image.open(io.BytesIO(image_bytes())).convert("RGB"), np.float32).transpose(2, 0, 1)
    np.testing.assert_allclose(item["pixel_values"], expected / 127.5 - 1.0, atol=1e-6)  # already 40x32
    assert dataset[9]["bad_record"][0] == "bad_caption"  # the expression was not evaluated


def test_cap_stops_the_run(tmp_path):
    lines = []
    for i in range(20):
        payload = b64(image_bytes(seed=i)) if i % 2 == 0 else b64(GARBAGE)
        lines.append(b"k%d\t{'caption': 'c%d'}\t" % (i, i) + payload)
    (tmp_path / "d.txt").write_bytes(b"\n".join(lines))
    (tmp_path / "files.list").write_text("d.txt\n")
    loader = build_image_caption_loader(Base64LineReader(tmp_path / "files.list"), TrainTransform(16), batch_size=2,
                                        num_replicas=1, rank=0, max_bad_fraction=0.25, min_records=6)
    batches = 0
    with pytest.raises(TooManyBadRecordsError, match=r"too many bad training records: \d+ of \d+ .*"
                                                     r"max_bad_fraction=0.25.*undecodable_image="):
        for _ in loader:
            batches += 1
    assert batches < 10 and loader.counter.num_seen >= 6


def test_all_bad_data_stops_with_message(tmp_path):
    (tmp_path / "d.txt").write_bytes(b"a\t{'caption': 'x'}\t" + b64(GARBAGE) + b"\nb\tonly-two-fields\n")
    (tmp_path / "files.list").write_text("d.txt\n")
    loader = build_image_caption_loader(Base64LineReader(tmp_path / "files.list"), TrainTransform(16), batch_size=1,
                                        num_replicas=1, rank=0, max_bad_fraction=1.0, min_records=100)
    with pytest.raises(TooManyBadRecordsError, match="all 2 training records of this pass were bad"):
        list(loader)
    (tmp_path / "only_missing.list").write_text("nope1.txt\nnope2.txt\n")
    reader = Base64LineReader(tmp_path / "only_missing.list")
    with pytest.raises(TooManyBadRecordsError, match="no readable records.*missing_file at .*nope1.txt"):
        build_image_caption_loader(reader, TrainTransform(16), batch_size=1, num_replicas=1, rank=0)


# ---------------------------------------------------------------- layout (b): image + caption folders
def test_image_folder_every_bad_record_counted(tmp_path):
    (tmp_path / "sub").mkdir()
    files = {"a.jpg": image_bytes(), "a.txt": b"first caption ", "b.png": image_bytes(fmt="PNG"), "b.txt": b"second",
             "c.jpg": image_bytes(),                                       # missing_file (no caption)
             "d.txt": b"orphan caption",                                   # missing_file (index error)
             "e.jpg": TRUNCATED_JPEG, "e.txt": b"truncated",              # undecodable_image
             "f.jpg": image_bytes(8, 8), "f.txt": b"small",                # image_too_small
             "g.jpg": image_bytes(), "g.txt": b"\xc3\x28 invalid utf8",    # non_utf8_caption
             "h.jpg": image_bytes(), "h.txt": b"   ",                      # bad_caption
             "sub/i.webp": image_bytes(fmt="WEBP"), "sub/i.txt": "un caf\u00e9".encode()}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    reader = ImageFolderReader(tmp_path)
    assert len(reader) == 8
    loader = build_image_caption_loader(reader, TrainTransform(16), batch_size=2, num_replicas=1, rank=0,
                                        min_width=16, min_height=16, max_bad_fraction=1.0)
    captions, _ = run_loader(loader)
    assert sorted(captions) == ["first caption", "second", "un caf\u00e9"]
    assert dict(loader.counter.bad_by_reason) == {"missing_file": 2, "undecodable_image": 1, "image_too_small": 1,
                                                  "non_utf8_caption": 1, "bad_caption": 1}


# ---------------------------------------------------------------- layout (c): webdataset tar shards
def add_member(archive, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def write_shards(root):
    with tarfile.open(root / "00000.tar", "w") as archive:
        add_member(archive, "000000000.jpg", image_bytes())
        add_member(archive, "000000000.txt", b"tar caption zero")
        add_member(archive, "000000000.json", b'{"caption": "ignored, txt wins", "key": "000000000"}')
        add_member(archive, "000000001.png", image_bytes(fmt="PNG"))
        add_member(archive, "000000001.json", b'{"caption": "from json", "width": 40}')
        add_member(archive, "000000002.jpg", image_bytes())                 # missing_file: no caption
        add_member(archive, "000000003.txt", b"no image")                   # missing_file: no image
        add_member(archive, "000000004.jpg", GARBAGE)                       # undecodable_image
        add_member(archive, "000000004.txt", b"garbage")
        add_member(archive, "000000005.jpg", image_bytes())                 # bad_caption
        add_member(archive, "000000005.json", b'{"status": "success"}')
        add_member(archive, "000000006.jpg", image_bytes(seed=3))
        add_member(archive, "000000006.txt", b"\xff bad")                    # non_utf8_caption
    write_cut_shard(root / "00001.tar", cut_inside_header=False)
    return [str(root / "00000.tar"), str(root / "00001.tar"), str(root / "00002.tar")]  # the last is missing


def write_cut_shard(path, cut_inside_header):
    with tarfile.open(path, "w") as archive:
        add_member(archive, "000010000.jpg", image_bytes(seed=4))
        add_member(archive, "000010000.txt", b"before the cut")
        add_member(archive, "000010001.jpg", image_bytes(seed=5))
        add_member(archive, "000010001.txt", b"cut off")
    data = path.read_bytes()
    second_image = data.index(image_bytes(seed=5))
    cut = data.index(b"cut off") - 200 if cut_inside_header else second_image + 100
    path.write_bytes(data[:cut])


EXPECTED_C = {"missing_file": 3, "undecodable_image": 1, "bad_caption": 1, "non_utf8_caption": 1,
              "truncated_shard": 1}
GOOD_C = ["before the cut", "from json", "tar caption zero"]


def test_tar_shards_indexed(tmp_path):
    reader = TarShardReader(write_shards(tmp_path))
    assert sorted(e.reason for e in reader.index_errors) == ["missing_file", "truncated_shard"]
    assert len(reader) == 8
    loader = build_image_caption_loader(reader, TrainTransform(16), batch_size=2, num_replicas=1, rank=0,
                                        max_bad_fraction=1.0)
    captions, _ = run_loader(loader)
    assert sorted(captions) == GOOD_C
    assert dict(loader.counter.bad_by_reason) == EXPECTED_C


@pytest.mark.parametrize("num_workers", [0, 2])
def test_tar_shards_streamed(tmp_path, num_workers):
    reader = TarShardReader(write_shards(tmp_path), build_index=False)
    stream = TarShardStream(reader, TrainTransform(16), num_replicas=1, rank=0, seed=None)
    loader = RobustDataLoader(stream, batch_size=3, num_workers=num_workers,
                              counter=BadRecordCounter(max_bad_fraction=1.0))
    captions, _ = run_loader(loader)
    assert sorted(captions) == GOOD_C
    assert dict(loader.counter.bad_by_reason) == EXPECTED_C
    # shards are split over replicas: rank 1 of 2 gets 00001.tar only
    other = TarShardStream(reader, TrainTransform(16), num_replicas=2, rank=1, seed=None)
    assert other.my_shards() == [1]


@pytest.mark.parametrize("cut_inside_header", [True, False])
def test_tar_shard_cut_anywhere_is_reported(tmp_path, cut_inside_header):
    write_cut_shard(tmp_path / "cut.tar", cut_inside_header)
    reader = TarShardReader([str(tmp_path / "cut.tar")])
    assert [e.reason for e in reader.index_errors] == ["truncated_shard"]
    assert [reader.read(i).caption for i in range(len(reader))] == ["before the cut"]
    streamed = [item for _, _, item in reader.iter_records()]
    assert [getattr(r, "caption", None) for r in streamed[:-1]] == ["before the cut"]
    assert streamed[-1].reason == "truncated_shard" and "cut.tar" in streamed[-1].where
    complete = tmp_path / "complete.tar"
    with tarfile.open(complete, "w") as archive:
        add_member(archive, "a.jpg", image_bytes())
        add_member(archive, "a.txt", b"whole")
    assert TarShardReader([str(complete)]).index_errors == []
    assert [r.caption for _, _, r in TarShardReader([str(complete)], build_index=False).iter_records()] == ["whole"]


# ---------------------------------------------------------------- sampler and resume
def test_sampler_partitions_replicas():
    samplers = [ResumableDistributedBatchSampler(50, 4, num_replicas=3, rank=r, seed=7) for r in range(3)]
    per_rank = [list(s) for s in samplers]
    assert all(len(batches) == 50 // 12 == len(s) for batches, s in zip(per_rank, samplers))
    flat = [i for batches in per_rank for batch in batches for i in batch]
    assert len(flat) == len(set(flat)) == 48
    permutation = np.random.default_rng([7, 0]).permutation(50)
    assert per_rank[1][2] == permutation[2 * 12 + 4: 2 * 12 + 8].tolist()  # slice r of global batch k


def test_sampler_groups_never_mix_and_fill():
    groups = np.array([0] * 7 + [1] * 5 + [-1] * 3)
    sampler = ResumableDistributedBatchSampler(15, 2, num_replicas=1, rank=0, seed=1, drop_last=False,
                                               group_ids=groups)
    batches = list(sampler)
    assert len(batches) == 4 + 3
    for batch in batches:
        assert len({groups[i] for i in batch}) == 1 and groups[batch[0]] >= 0
    assert sorted({i for b in batches for i in b}) == list(range(12))


def test_sampler_resume_gives_exactly_the_remaining_batches():
    kwargs = dict(num_samples=37, batch_size=3, num_replicas=2, rank=1, seed=5)
    reference = ResumableDistributedBatchSampler(**kwargs)
    full = list(reference) + list(reference)  # two epochs; the second starts by itself
    sampler = ResumableDistributedBatchSampler(**kwargs)
    iterator = iter(sampler)
    consumed = [next(iterator) for _ in range(4)]
    state = sampler.state_dict()
    assert (state["epoch"], state["position"]) == (0, 4)
    restored = ResumableDistributedBatchSampler(**kwargs)
    restored.set_state_dict(state)
    assert consumed + list(restored) + list(restored) == full
    assert full[:6] != full[6:]  # the epochs differ
    with pytest.raises(ValueError, match="batch_size saved=3 now=4"):
        ResumableDistributedBatchSampler(**dict(kwargs, batch_size=4)).set_state_dict(state)


def test_loader_resume_with_workers(tmp_path):
    lines = [b"k%d\t{'caption': 'c%d'}\t" % (i, i) + b64(image_bytes(20, 20, seed=i)) for i in range(18)]
    (tmp_path / "d.txt").write_bytes(b"\n".join(lines))
    (tmp_path / "files.list").write_text("d.txt\n")

    def make_loader():
        return build_image_caption_loader(Base64LineReader(tmp_path / "files.list"), TrainTransform(8), batch_size=2,
                                          num_workers=2, seed=3, num_replicas=1, rank=0)

    uninterrupted = [b["indices"].numpy().tolist() for b in make_loader()]
    loader = make_loader()
    seen = []
    for batch in loader:
        seen.append(batch["indices"].numpy().tolist())
        if len(seen) == 3:
            state = loader.state_dict()
            break
    assert state["sampler"]["position"] == 3 and state["bad_records"]["num_good"] == 6
    resumed = make_loader()
    resumed.set_state_dict(state)
    rest = [b["indices"].numpy().tolist() for b in resumed]
    assert seen + rest == uninterrupted
    assert resumed.counter.num_good == 18
    # the same loader, iterated again after leaving the loop early, goes on where the loop stopped
    assert seen + [b["indices"].numpy().tolist() for b in loader] == uninterrupted
    # and the next pass is the next epoch
    assert [b["indices"].numpy().tolist() for b in loader] != uninterrupted


# ---------------------------------------------------------------- transforms
def test_buckets_and_crops():
    buckets = AspectRatioBuckets(resolution=1024, step=64, max_aspect=2.0)
    for height, width in buckets.sizes:
        assert height % 64 == 0 and width % 64 == 0 and height * width <= 1024 * 1024
        assert 0.5 <= width / height <= 2.0
        assert buckets.sizes[buckets.nearest(width * 3, height * 3)] == (height, width)
    assert (1024, 1024) in buckets.sizes
    pixels = np.arange(50 * 100 * 3, dtype=np.uint32).reshape(50, 100, 3) % 256
    image = Image.fromarray(pixels.astype(np.uint8))
    cropped = np.asarray(resize_and_crop(image, 50, 50))
    np.testing.assert_array_equal(cropped, pixels[:, 25:75].astype(np.uint8))  # no resize, centre crop
    assert resize_and_crop(image, 20, 30).size == (30, 20)
    normalised = to_normalized_array(Image.fromarray(np.array([[[0, 255, 51]]], dtype=np.uint8)))
    np.testing.assert_allclose(normalised[:, 0, 0], [-1.0, 1.0, 51 / 127.5 - 1.0], atol=1e-7)
    transform = TrainTransform(resolution=(24, 24), random_crop=True, random_flip=True, seed=2)
    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    np.testing.assert_array_equal(transform(big, index=5), transform(big, index=5))
    assert transform(big, index=5).shape == (3, 24, 24)


def test_bucketed_loader_batches_stack(tmp_path):
    sizes = [(64, 32), (32, 64), (64, 32), (32, 64), (48, 48), (48, 48)]
    for i, (width, height) in enumerate(sizes):
        (tmp_path / f"{i}.jpg").write_bytes(image_bytes(width, height, seed=i))
        (tmp_path / f"{i}.txt").write_text(f"caption {i}")
    buckets = AspectRatioBuckets(sizes=[(16, 32), (24, 24), (32, 16)])
    loader = build_image_caption_loader(ImageFolderReader(tmp_path), TrainTransform(buckets=buckets), batch_size=2,
                                        num_replicas=1, rank=0)
    shapes = sorted(tuple(b["pixel_values"].shape) for b in loader)
    assert shapes == [(2, 3, 16, 32), (2, 3, 24, 24), (2, 3, 32, 16)]


class FailingDataset(ImageCaptionDataset):
    def __getitem__(self, index):
        raise RuntimeError(f"unexpected failure at {index}")


def test_unexpected_error_propagates_instead_of_hanging(tmp_path):
    # paddle's single-process DataLoader waits forever on such an error; ours raises it
    (tmp_path / "a.jpg").write_bytes(image_bytes())
    (tmp_path / "a.txt").write_text("caption")
    reader = ImageFolderReader(tmp_path)
    sampler = ResumableDistributedBatchSampler(1, 1, num_replicas=1, rank=0)
    loader = RobustDataLoader(FailingDataset(reader, TrainTransform(8)), sampler)
    with pytest.raises(RuntimeError, match="unexpected failure at 0"):
        list(loader)


# ---------------------------------------------------------------- streamed tar shards: exact mid-epoch resume
def write_stream_shards(root, num_shards=3, per_shard=5):
    """Shards of ``per_shard`` samples; sample 2 of shard 1 is undecodable (a bad record mid-stream)."""
    paths = []
    for shard in range(num_shards):
        path = root / f"{shard:05d}.tar"
        with tarfile.open(path, "w") as archive:
            for item in range(per_shard):
                key = f"{shard:05d}{item:04d}"
                bad = (shard, item) == (1, 2)
                add_member(archive, f"{key}.jpg", GARBAGE if bad else image_bytes(24, 20, seed=shard * 10 + item))
                add_member(archive, f"{key}.txt", f"s{shard} i{item}".encode())
        paths.append(str(path))
    return paths


def stream_loader(paths, num_workers=0, seed=4):
    reader = TarShardReader(paths, build_index=False)
    stream = TarShardStream(reader, TrainTransform(16, random_crop=True, random_flip=True, seed=1),
                            num_replicas=1, rank=0, seed=seed)
    return RobustDataLoader(stream, batch_size=2, num_workers=num_workers,
                            counter=BadRecordCounter(max_bad_fraction=1.0))


def stream_batches(loader, epochs=1, stop_after=None):
    """(captions, pixel sums) per batch over ``epochs`` passes; stops after ``stop_after`` batches."""
    batches = []
    for _ in range(epochs):
        for batch in loader:
            batches.append((batch["captions"], round(float(batch["pixel_values"].sum()), 3)))
            if stop_after is not None and len(batches) == stop_after:
                return batches
    return batches


@pytest.mark.parametrize("stop_after", [1, 4, 8])
def test_tar_stream_resumes_at_the_same_record(tmp_path, stop_after):
    import json

    paths = write_stream_shards(tmp_path)
    uninterrupted = stream_batches(stream_loader(paths), epochs=2)
    assert len(uninterrupted) == 2 * 8  # 15 items (14 good) per epoch in batches of 2
    assert uninterrupted[:8] != uninterrupted[8:]  # the shard order is shuffled per epoch
    loader = stream_loader(paths)
    first = stream_batches(loader, epochs=1, stop_after=stop_after)
    state = json.loads(json.dumps(loader.state_dict()))  # as a checkpoint stores it
    resumed = stream_loader(paths)
    resumed.set_state_dict(state)
    # the rest of epoch 0, then epoch 1 (stopped after the epoch's last batch, the first pass is empty)
    rest = stream_batches(resumed, epochs=2)
    assert first + rest == uninterrupted
    assert resumed.counter.num_good == 28 and dict(resumed.counter.bad_by_reason) == {"undecodable_image": 2}


def test_tar_stream_resume_with_workers_gives_each_remaining_record_once(tmp_path):
    paths = write_stream_shards(tmp_path, num_shards=4, per_shard=3)
    loader = stream_loader(paths, num_workers=2)
    first = stream_batches(loader, stop_after=2)
    resumed = stream_loader(paths, num_workers=2)
    resumed.set_state_dict(loader.state_dict())
    rest = stream_batches(resumed)
    captions = [c for batch, _ in first + rest for c in batch]
    assert sorted(captions) == sorted(f"s{s} i{i}" for s in range(4) for i in range(3) if (s, i) != (1, 2))


def test_tar_stream_refuses_another_layout(tmp_path):
    paths = write_stream_shards(tmp_path)
    state = stream_loader(paths).state_dict()
    with pytest.raises(ValueError, match="shards saved=.*00002.tar.*now="):
        stream_loader(paths[:2]).set_state_dict(state)
    with pytest.raises(ValueError, match="seed saved=4 now=5"):
        stream_loader(paths, seed=5).set_state_dict(state)
