"""Indexed readers for two training-set layouts (the tar-shard layout is in ``tar_shards.py``).

Every reader has the same small interface: ``len(reader)``, ``reader.read(index) -> RawRecord``
(raising :class:`BadRecordError` for a bad record, never retrying), ``reader.where(index)`` and
``reader.index_errors`` (bad records found while building the index, e.g. a listed file that does
not exist). Datasets in ``datasets.py`` turn these into training samples.

Layout (a), :class:`Base64LineReader` -- base64 lines listed in a file list:

* the file list is a text file with one data-file path per line (relative paths are taken from the
  file list's folder; blank lines and lines starting with ``#`` are ignored);
* each data file holds one or more records, one per line, ``\\n``-terminated, three fields separated
  by TAB::

      <sample id>\\t<caption field>\\t<base64-encoded image file>

  The caption field is a Python dict literal or JSON object holding the caption under ``"caption"``
  (``{'caption': 'a dog', 'url': '...'}``), or plain text. It is parsed with ``json.loads`` /
  ``ast.literal_eval`` -- never ``eval``. Field positions and count are configurable.

Layout (b), :class:`ImageFolderReader` -- ``name.jpg`` next to ``name.txt`` (UTF-8 caption), in a
folder searched recursively.
"""
import io
import os
from array import array

import numpy as np
from PIL import Image

from .bad_records import (BAD_CAPTION, MISSING_FILE, UNDECODABLE_IMAGE, WRONG_FIELD_COUNT, BadRecord,
                          BadRecordError)
from .records import RawRecord, decode_base64, decode_utf8, parse_caption_field

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class Base64LineReader:
    """Layout (a): records are TAB-separated lines in files named by a file list.

    Args:
        file_list: path of the file list (see the module docstring).
        caption_field: index of the caption field in a line.
        image_field: index of the base64 image field.
        num_fields: exact number of fields a line must have.
        caption_key: key of the caption in the caption dict.

    Indexing reads every listed file once and keeps 12 bytes per record (file id, byte offset,
    line number); records are then read by seeking.
    """

    def __init__(self, file_list, caption_field=1, image_field=2, num_fields=3, caption_key="caption"):
        if max(caption_field, image_field) >= num_fields:
            raise ValueError(f"caption_field={caption_field} / image_field={image_field} must be < num_fields={num_fields}")
        self.caption_field, self.image_field, self.num_fields = caption_field, image_field, num_fields
        self.caption_key = caption_key
        self.files = self._read_file_list(file_list)
        self.index_errors = []
        file_ids, offsets, line_numbers = array("i"), array("q"), array("i")
        for file_id, path in enumerate(self.files):
            try:
                handle = open(path, "rb")
            except OSError as error:
                self.index_errors.append(BadRecord(MISSING_FILE, path, error.strerror or str(error)))
                continue
            with handle:
                offset = 0
                for line_number, line in enumerate(handle, start=1):
                    if line.strip():
                        file_ids.append(file_id)
                        offsets.append(offset)
                        line_numbers.append(line_number)
                    offset += len(line)
        self._file_ids = np.asarray(file_ids, dtype=np.int32)
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._line_numbers = np.asarray(line_numbers, dtype=np.int32)

    @staticmethod
    def _read_file_list(file_list):
        if not os.path.isfile(file_list):
            raise FileNotFoundError(f"file list {file_list} does not exist")
        folder = os.path.dirname(os.path.abspath(file_list))
        with open(file_list, encoding="utf-8") as handle:
            names = [line.strip() for line in handle]
        paths = [os.path.join(folder, name) for name in names if name and not name.startswith("#")]
        if not paths:
            raise ValueError(f"file list {file_list} names no files")
        return paths

    def __len__(self):
        return len(self._offsets)

    def where(self, index):
        return f"{self.files[self._file_ids[index]]}:{self._line_numbers[index]}"

    def read(self, index):
        where = self.where(index)
        path = self.files[self._file_ids[index]]
        try:
            with open(path, "rb") as handle:
                handle.seek(int(self._offsets[index]))
                line = handle.readline()
        except OSError as error:
            raise BadRecordError(MISSING_FILE, where, error.strerror or error) from None
        fields = line.rstrip(b"\r\n").split(b"\t")
        if len(fields) != self.num_fields:
            raise BadRecordError(WRONG_FIELD_COUNT, where, f"{len(fields)} fields, expected {self.num_fields}")
        caption_text = decode_utf8(fields[self.caption_field], where)
        caption = parse_caption_field(caption_text, where, self.caption_key)
        image_bytes = decode_base64(fields[self.image_field], where)
        return RawRecord(where=where, caption=caption, image_bytes=image_bytes)


class ImageFolderReader:
    """Layout (b): ``<stem>.<image ext>`` with its caption in ``<stem>.txt`` beside it.

    Args:
        root: folder, searched recursively; files are sorted by path so indices are stable.
        caption_extension: extension of the caption files.

    A caption file without an image is reported in ``index_errors`` (``missing_file``); an image
    without a caption file is a ``missing_file`` bad record when read.
    """

    def __init__(self, root, caption_extension=".txt", image_extensions=IMAGE_EXTENSIONS):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root} does not exist")
        self.caption_extension = caption_extension
        images, captions = [], []
        for folder, _, names in os.walk(root):
            for name in names:
                extension = os.path.splitext(name)[1].lower()
                if extension in image_extensions:
                    images.append(os.path.join(folder, name))
                elif extension == caption_extension:
                    captions.append(os.path.join(folder, name))
        self.images = sorted(images)
        image_stems = {os.path.splitext(p)[0] for p in self.images}
        self.index_errors = [BadRecord(MISSING_FILE, p, "caption file without an image")
                             for p in sorted(captions) if os.path.splitext(p)[0] not in image_stems]

    def __len__(self):
        return len(self.images)

    def where(self, index):
        return self.images[index]

    def read(self, index):
        image_path = self.images[index]
        caption_path = os.path.splitext(image_path)[0] + self.caption_extension
        for path in (caption_path, image_path):
            if not os.path.isfile(path):
                raise BadRecordError(MISSING_FILE, image_path, f"{path} does not exist")
        with open(caption_path, "rb") as handle:
            caption = decode_utf8(handle.read(), caption_path).strip()
        if not caption:
            raise BadRecordError(BAD_CAPTION, caption_path, "empty caption")
        with open(image_path, "rb") as handle:
            image_bytes = handle.read()
        return RawRecord(where=image_path, caption=caption, image_bytes=image_bytes)


def image_size(image_bytes):
    """``(width, height)`` from the image header only (no pixel decoding); None if unreadable."""
    try:
        with Image.open(io.BytesIO(image_bytes)) as image:
            return image.size
    except Exception:  # any decoder failure: the record is reported as undecodable
        return None


def scan_image_sizes(reader):
    """Image size of every record, read from the image headers (for aspect-ratio buckets).

    Returns:
        ``(sizes, bad_records)``: ``sizes`` an ``[N, 2]`` int64 array of (width, height), ``-1`` for
        records that cannot be read; ``bad_records`` the :class:`BadRecord` of each of those.
    """
    sizes = np.full((len(reader), 2), -1, dtype=np.int64)
    bad_records = []
    for index in range(len(reader)):
        try:
            record = reader.read(index)
        except BadRecordError as error:
            bad_records.append(error.record)
            continue
        size = image_size(record.image_bytes)
        if size is None:
            bad_records.append(BadRecord(UNDECODABLE_IMAGE, record.where, "unreadable image header"))
        else:
            sizes[index] = size
    return sizes, bad_records
