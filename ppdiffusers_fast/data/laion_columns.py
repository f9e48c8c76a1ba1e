"""Column names of LAION metadata parquet files, which vary between releases.

laion-aesthetics-v2 files name their columns ``URL, TEXT, WIDTH, HEIGHT, similarity, punsafe,
pwatermark, AESTHETIC_SCORE``; other releases and re-exports use ``url``, ``caption``/``text``,
``width``, ``aesthetic``/``aesthetic_score``, ``watermark``... :func:`map_columns` finds, for each
canonical name below, the first alias present in a file (exact spelling first, then ignoring case).
"""
import pyarrow as pa

# canonical name -> accepted spellings, in order of preference
COLUMN_ALIASES = {
    "url": ("URL", "url", "image_url"),
    "caption": ("TEXT", "caption", "text"),
    "width": ("WIDTH", "width"),
    "height": ("HEIGHT", "height"),
    "aesthetic_score": ("AESTHETIC_SCORE", "aesthetic_score", "aesthetic"),
    "pwatermark": ("pwatermark", "watermark", "p_watermark"),
    "punsafe": ("punsafe", "p_unsafe"),
    "similarity": ("similarity",),
}

NUMERIC_COLUMNS = ("width", "height", "aesthetic_score", "pwatermark", "punsafe", "similarity")
TEXT_COLUMNS = ("url", "caption")

# The fixed schema of the filtered output, whatever the input spelling was.
OUTPUT_SCHEMA = pa.schema([
    ("url", pa.string()),
    ("caption", pa.string()),
    ("width", pa.int64()),
    ("height", pa.int64()),
    ("aesthetic_score", pa.float64()),
    ("pwatermark", pa.float64()),
    ("punsafe", pa.float64()),
    ("similarity", pa.float64()),
])


class LaionColumnError(ValueError):
    """A required column is missing or has an unusable type."""


def map_columns(column_names):
    """Map canonical names to the column names present in a file.

    Args:
        column_names: the file's column names.
    Returns:
        ``{canonical: actual}`` for every canonical name that has a match.
    """
    names = list(column_names)
    lowered = {}
    for name in names:
        lowered.setdefault(name.lower(), name)
    mapping = {}
    for canonical, aliases in COLUMN_ALIASES.items():
        for alias in aliases:
            if alias in names:
                mapping[canonical] = alias
                break
        else:
            for alias in aliases:
                if alias.lower() in lowered:
                    mapping[canonical] = lowered[alias.lower()]
                    break
    return mapping


def check_columns(schema, mapping, required, path):
    """Raise :class:`LaionColumnError` naming the file if a required column is missing or mistyped.

    Args:
        schema: the file's ``pyarrow.Schema``.
        mapping: the result of :func:`map_columns`.
        required: canonical names the active filter rules need.
        path: the file, quoted in the message.
    """
    for canonical in required:
        if canonical not in mapping:
            raise LaionColumnError(
                f"{path}: required column {canonical!r} not found (accepted names: "
                f"{', '.join(COLUMN_ALIASES[canonical])}; the file has: {', '.join(schema.names)})")
    for canonical, actual in mapping.items():
        column_type = schema.field(actual).type
        if canonical in NUMERIC_COLUMNS and not (pa.types.is_integer(column_type)
                                                 or pa.types.is_floating(column_type)
                                                 or pa.types.is_decimal(column_type)
                                                 or pa.types.is_null(column_type)):
            raise LaionColumnError(f"{path}: column {actual!r} ({canonical}) has type {column_type}, "
                                   f"expected a number")
        if canonical in TEXT_COLUMNS and not (pa.types.is_string(column_type)
                                              or pa.types.is_large_string(column_type)
                                              or pa.types.is_null(column_type)):
            raise LaionColumnError(f"{path}: column {actual!r} ({canonical}) has type {column_type}, "
                                   f"expected a string")
