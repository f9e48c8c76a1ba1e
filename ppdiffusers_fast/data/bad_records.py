"""Counting bad training records, and stopping when too many are bad.

A multi-day run must neither crash on one corrupt file nor spin forever on a broken data set. Every
reader therefore reports a bad record as a :class:`BadRecord` (reason + where + detail) instead of
raising or retrying, and one :class:`BadRecordCounter` in the main process:

* counts each bad record under its reason and logs one line naming it (file and line or tar member);
* raises :class:`TooManyBadRecordsError` once at least ``min_records`` records were seen and the
  share of bad ones exceeds ``max_bad_fraction``;
* raises :class:`TooManyBadRecordsError` at the end of an epoch in which no record was good
  (a data set that is all bad stops even when it is smaller than ``min_records``).
"""
import logging
from collections import Counter
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# Reasons a record is skipped. Readers use exactly these names; the counter accepts no others.
MISSING_FILE = "missing_file"              # a listed file, an image, or its caption file does not exist
WRONG_FIELD_COUNT = "wrong_field_count"    # a tab-separated line with the wrong number of fields
BAD_CAPTION = "bad_caption"                # caption field unparsable, without the caption key, or empty
NON_UTF8_CAPTION = "non_utf8_caption"      # caption bytes are not valid UTF-8
UNDECODABLE_IMAGE = "undecodable_image"    # bad base64, truncated or otherwise undecodable image bytes
IMAGE_TOO_SMALL = "image_too_small"        # decoded image narrower or lower than the minimum size
TRUNCATED_SHARD = "truncated_shard"        # a tar shard that ends inside a member or header

REASONS = (MISSING_FILE, WRONG_FIELD_COUNT, BAD_CAPTION, NON_UTF8_CAPTION, UNDECODABLE_IMAGE,
           IMAGE_TOO_SMALL, TRUNCATED_SHARD)


@dataclass(frozen=True)
class BadRecord:
    """One skipped record.

    Attributes:
        reason: one of :data:`REASONS`.
        where: the record's location, e.g. ``"shard_00.txt:17"`` or ``"00000.tar:000012.jpg"``.
        detail: a short human-readable cause (exception text), may be empty.
    """

    reason: str
    where: str
    detail: str = ""

    def __post_init__(self):
        if self.reason not in REASONS:
            raise ValueError(f"unknown bad-record reason {self.reason!r}; expected one of {REASONS}")

    def as_tuple(self):
        """Plain ``(reason, where, detail)``, safe to pass between DataLoader worker processes."""
        return (self.reason, self.where, self.detail)


class BadRecordError(Exception):
    """Raised inside a reader for one bad record; carries the :class:`BadRecord`."""

    def __init__(self, reason, where, detail=""):
        self.record = BadRecord(reason, where, str(detail)[:300])
        super().__init__(f"{reason} at {where}: {detail}")


class TooManyBadRecordsError(RuntimeError):
    """The share of bad records passed the configured cap, or no record at all was good."""


class BadRecordCounter:
    """Counts good and bad records and enforces the cap.

    Args:
        max_bad_fraction: largest tolerated share of bad records, in [0, 1]; 1.0 never stops on the
            share (an all-bad epoch still stops).
        min_records: the share is checked only after this many records (good + bad) were seen, so a
            few bad records at the start do not stop a run.
        log_every_record: log one warning line per bad record (``False`` logs only the first 100).
    """

    def __init__(self, max_bad_fraction=0.05, min_records=100, log_every_record=True):
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        if min_records < 1:
            raise ValueError(f"min_records must be >= 1, got {min_records}")
        self.max_bad_fraction = float(max_bad_fraction)
        self.min_records = int(min_records)
        self.log_every_record = log_every_record
        self.num_good = 0
        self.bad_by_reason = Counter()
        self.examples = []  # the first few BadRecords, quoted in error messages
        self._epoch_good = 0
        self._epoch_bad = 0

    @property
    def num_bad(self):
        return sum(self.bad_by_reason.values())

    @property
    def num_seen(self):
        return self.num_good + self.num_bad

    def add_good(self, count=1):
        self.num_good += count
        self._epoch_good += count

    def add_bad(self, record, check=True):
        """Count and log one :class:`BadRecord` (or ``(reason, where, detail)`` tuple)."""
        if not isinstance(record, BadRecord):
            record = BadRecord(*record)
        self.bad_by_reason[record.reason] += 1
        self._epoch_bad += 1
        if len(self.examples) < 5:
            self.examples.append(record)
        if self.log_every_record or self.num_bad <= 100:
            logger.warning("skipping bad record (%s) at %s%s", record.reason, record.where,
                           f": {record.detail}" if record.detail else "")
        if check:
            self.check()

    def check(self):
        """Raise :class:`TooManyBadRecordsError` if the share of bad records is past the cap."""
        seen = self.num_seen
        if seen >= self.min_records and self.num_bad > self.max_bad_fraction * seen:
            raise TooManyBadRecordsError(
                f"too many bad training records: {self.num_bad} of {seen} "
                f"({100.0 * self.num_bad / seen:.1f}%) exceed max_bad_fraction={self.max_bad_fraction} "
                f"(checked after min_records={self.min_records}). {self._describe()}")

    def end_epoch(self):
        """Call after each pass over the data; raises if that pass saw records but no good one."""
        good, bad = self._epoch_good, self._epoch_bad
        self._epoch_good = self._epoch_bad = 0
        if good == 0 and bad > 0:
            raise TooManyBadRecordsError(
                f"all {bad} training records of this pass were bad; nothing to train on. {self._describe()}")

    def summary(self):
        """JSON-friendly counts: ``{"good": n, "bad": m, "bad_by_reason": {...}}``."""
        return {"good": self.num_good, "bad": self.num_bad, "bad_by_reason": dict(self.bad_by_reason)}

    def state_dict(self):
        return {"num_good": self.num_good, "bad_by_reason": dict(self.bad_by_reason)}

    def set_state_dict(self, state):
        self.num_good = int(state["num_good"])
        self.bad_by_reason = Counter({k: int(v) for k, v in state["bad_by_reason"].items()})

    def _describe(self):
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.bad_by_reason.items()))
        first = "; ".join(f"{r.reason} at {r.where}" + (f" ({r.detail})" if r.detail else "")
                          for r in self.examples)
        return f"Counts by reason: {reasons}. First bad records: {first}."
