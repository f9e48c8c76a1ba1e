"""Layout (c): webdataset tar shards as img2dataset writes them.

A shard ``00000.tar`` holds, per sample, members that share a key and differ by extension::

    000000012.jpg   the image (also .jpeg / .png / .webp)
    000000012.txt   the caption (UTF-8)
    000000012.json  metadata; its "caption" is used when there is no .txt

The key is the member path up to the first dot of its file name. :class:`TarShardReader` offers
both access patterns over the same shards:

* ``iter_records()`` streams each shard front to back with ``tarfile`` in stream mode (``r|*``,
  compressed shards too), grouping consecutive members by key; each item has a fixed ordinal in its
  shard, so a stream can resume at the item where it stopped (``skip``);
* ``read(index)`` gives random access for shuffled, resumable training: an index of member offsets
  built from the tar headers (uncompressed ``.tar`` only) and reads by seeking.

A shard that ends inside a header or member, or without the end-of-archive marker, is a
``truncated_shard`` bad record; the samples before the one being read at the cut are still used.
"""
import glob
import os
import tarfile

from .bad_records import BAD_CAPTION, MISSING_FILE, TRUNCATED_SHARD, BadRecord, BadRecordError
from .records import RawRecord, decode_utf8, parse_caption_field

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSIONS = ("txt", "json")


def resolve_shards(spec):
    """A shard, a folder (``*.tar*`` inside), a glob, or a list of these -> sorted paths."""
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    shards = []
    for item in specs:
        item = os.fspath(item)
        if os.path.isdir(item):
            shards += glob.glob(os.path.join(item, "*.tar")) + glob.glob(os.path.join(item, "*.tar.gz"))
        elif any(ch in item for ch in "*?["):
            shards += glob.glob(item)
        else:
            shards.append(item)  # a missing file is reported as a bad record, not here
    if not shards:
        raise FileNotFoundError(f"no tar shards found in {spec!r}")
    return sorted(set(shards))


def split_key(member_name):
    """``"dir/000012.jpg"`` -> ``("dir/000012", "jpg")``; the extension is lower-cased."""
    folder, base = os.path.split(member_name)
    stem, _, extension = base.partition(".")
    return os.path.join(folder, stem) if folder else stem, extension.lower()


def assemble_record(shard, key, parts):
    """Build a :class:`RawRecord` from ``{extension: bytes}``; raises :class:`BadRecordError`."""
    where = f"{shard}:{key}"
    image_extension = next((e for e in IMAGE_EXTENSIONS if e in parts), None)
    if image_extension is None:
        raise BadRecordError(MISSING_FILE, where, f"no image member (found: {sorted(parts)})")
    if "txt" in parts:
        caption = decode_utf8(parts["txt"], f"{where}.txt").strip()
        if not caption:
            raise BadRecordError(BAD_CAPTION, f"{where}.txt", "empty caption")
    elif "json" in parts:
        caption = parse_caption_field(decode_utf8(parts["json"], f"{where}.json"), f"{where}.json")
    else:
        raise BadRecordError(MISSING_FILE, where, f"no caption member (.txt or .json; found: {sorted(parts)})")
    return RawRecord(where=f"{where}.{image_extension}", caption=caption, image_bytes=parts[image_extension])


class TarShardReader:
    """Webdataset shards, streamed (``iter_records``) or indexed (``read``).

    Args:
        shards: see :func:`resolve_shards`.
        build_index: scan the tar headers now so that ``len``/``read`` work (uncompressed shards).
    """

    def __init__(self, shards, build_index=True):
        self.shards = resolve_shards(shards)
        self.index_errors = []
        self._samples = []  # (shard id, key, {extension: (data offset, size)})
        if build_index:
            for shard_id, shard in enumerate(self.shards):
                self._index_shard(shard_id, shard)

    def _index_shard(self, shard_id, shard):
        if not os.path.isfile(shard):
            self.index_errors.append(BadRecord(MISSING_FILE, shard, "shard does not exist"))
            return
        if not shard.endswith(".tar"):
            raise ValueError(f"{shard}: random access needs an uncompressed .tar; use iter_records() to stream it")
        groups, order = {}, []
        try:
            with tarfile.open(shard, mode="r:") as archive:
                for member in archive:
                    if not member.isfile():
                        continue
                    key, extension = split_key(member.name)
                    if key not in groups:
                        groups[key] = {}
                        order.append(key)
                    groups[key][extension] = (member.offset_data, member.size)
                    if member.offset_data + member.size > os.path.getsize(shard):
                        raise tarfile.ReadError(f"member {member.name} runs past the end of the file")
                check_end_of_archive(shard, archive.offset)
        except (tarfile.TarError, EOFError, OSError) as error:
            self.index_errors.append(BadRecord(TRUNCATED_SHARD, shard, f"{error}; later samples dropped"))
            if order:  # the sample being read when the shard ended is incomplete
                groups.pop(order.pop())
        self._samples += [(shard_id, key, groups[key]) for key in order]

    def __len__(self):
        return len(self._samples)

    def where(self, index):
        shard_id, key, _ = self._samples[index]
        return f"{self.shards[shard_id]}:{key}"

    def read(self, index):
        shard_id, key, members = self._samples[index]
        shard = self.shards[shard_id]
        wanted = [e for e in members if e in IMAGE_EXTENSIONS + CAPTION_EXTENSIONS]
        parts = {}
        try:
            with open(shard, "rb") as handle:
                for extension in wanted:
                    offset, size = members[extension]
                    handle.seek(offset)
                    parts[extension] = handle.read(size)
        except OSError as error:
            raise BadRecordError(MISSING_FILE, f"{shard}:{key}", error.strerror or error) from None
        return assemble_record(shard, key, parts)

    def iter_records(self, shard_ids=None, skip=None):
        """Stream records shard by shard.

        Args:
            shard_ids: which shards (indices into ``self.shards``); all by default.
            skip: optional ``{shard id: n}``; the first ``n`` items of that shard are passed over without
                reading their data (to resume a stream at the record where it stopped).
        Yields:
            ``(shard id, ordinal, item)``: ``item`` a :class:`RawRecord` for a good sample or a
            :class:`BadRecord`; ``ordinal`` counts the items of the shard from 0 (the same on every pass).
        """
        skip = skip or {}
        for shard_id in range(len(self.shards)) if shard_ids is None else shard_ids:
            for ordinal, item in self._stream_shard(self.shards[shard_id], skip.get(shard_id, 0)):
                yield shard_id, ordinal, item

    def _stream_shard(self, shard, skip=0):
        """``(ordinal, item)`` of one shard; items with ``ordinal < skip`` are not read."""
        if not os.path.isfile(shard):
            if skip < 1:
                yield 0, BadRecord(MISSING_FILE, shard, "shard does not exist")
            return
        key, parts, ordinal = None, {}, -1
        try:
            with tarfile.open(shard, mode="r|*") as archive:
                for member in archive:
                    if not member.isfile():
                        continue
                    member_key, extension = split_key(member.name)
                    if member_key != key:
                        if key is not None and ordinal >= skip:
                            yield ordinal, _assemble_or_bad(shard, key, parts)
                        key, parts, ordinal = member_key, {}, ordinal + 1
                    if ordinal >= skip and extension in IMAGE_EXTENSIONS + CAPTION_EXTENSIONS:
                        data = archive.extractfile(member).read()
                        if len(data) != member.size:
                            raise tarfile.ReadError(f"member {member.name} is cut short")
                        parts[extension] = data
                if shard.endswith(".tar"):
                    check_end_of_archive(shard, archive.offset)
        except (tarfile.TarError, EOFError, OSError) as error:
            # the sample being read at the cut is dropped; the report takes its place in the ordinals
            if max(ordinal, 0) >= skip:
                yield max(ordinal, 0), BadRecord(TRUNCATED_SHARD, shard, f"{error}; sample {key} and later ones dropped")
            return
        if key is not None and ordinal >= skip:
            yield ordinal, _assemble_or_bad(shard, key, parts)


def check_end_of_archive(shard, offset):
    """Raise ``tarfile.ReadError`` unless ``shard`` ends with the end-of-archive marker after ``offset``.

    ``tarfile`` stops without a word at a header cut in half; a complete archive has at least two
    zero blocks (1024 bytes) after its last member, so anything else there means the shard was cut.
    """
    with open(shard, "rb") as handle:
        handle.seek(offset)
        tail = handle.read()
    if len(tail) < 1024 or tail.count(0) != len(tail):
        raise tarfile.ReadError(f"no end-of-archive marker after byte {offset} (file cut short)")


def _assemble_or_bad(shard, key, parts):
    try:
        return assemble_record(shard, key, parts)
    except BadRecordError as error:
        return error.record
