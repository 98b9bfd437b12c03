"""Interaction readers: every format becomes one time-ordered item list per user, with
items re-indexed from 1 (0 is padding) in order of first appearance.

Formats:
- `sasrec`: "user item" per line, each user's lines in time order (the SASRec authors' files);
- `sequences`: one user per line, space-separated items in time order;
- `inter`: RecBole atomic file, tab-separated with a typed header (user_id:token, item_id:token,
  timestamp:float, ...), sorted by timestamp per user;
- `csv`: "user,item,timestamp[,rating]" with an optional header, sorted by timestamp per user.
"""

from __future__ import annotations

import csv
import dataclasses
from collections import Counter
from pathlib import Path

FORMATS = ("sasrec", "sequences", "inter", "csv")


class DataFormatError(ValueError):
    """A malformed input file; the message names the file and line."""


@dataclasses.dataclass
class Interactions:
    """Per-user item sequences (ids 1..num_items, time order) and where they came from."""

    sequences: list[list[int]]
    num_items: int
    source: str

    @property
    def num_users(self) -> int:
        return len(self.sequences)

    @property
    def num_interactions(self) -> int:
        return sum(map(len, self.sequences))


def guess_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".inter":
        return "inter"
    if suffix == ".csv":
        return "csv"
    first = next(_lines(path), (1, ""))[1].split()
    return "sasrec" if len(first) == 2 else "sequences"


def _fail(path, line_number, message):
    raise DataFormatError(f"{path}:{line_number}: {message}")


def _lines(path):
    """(line number, text) of each line of a UTF-8 file, "\r\n" read as "\n"; a line that is
    not UTF-8 raises DataFormatError naming the file and line (decoding a whole file at once
    would name neither)."""
    with path.open("rb") as f:
        for line_number, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                _fail(path, line_number, f"not UTF-8 text (byte {raw[error.start]:#04x} at column {error.start + 1})")
            yield line_number, text[:-2] + "\n" if text.endswith("\r\n") else text


def _read_sasrec(path):
    events = {}  # user -> [(order, item)]
    for line_number, line in _lines(path):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            _fail(path, line_number, f"expected 'user item', got {line.strip()!r}")
        events.setdefault(fields[0], []).append((line_number, fields[1]))
    return events


def _read_sequences(path):
    events = {}
    for line_number, line in _lines(path):
        items = line.split()
        if items:
            events[f"line{line_number}"] = list(enumerate(items))
    return events


def _parse_time(path, line_number, value):
    try:
        return float(value)
    except ValueError:
        _fail(path, line_number, f"expected a numeric timestamp, got {value!r}")


def _read_inter(path):
    events = {}
    lines = _lines(path)
    header = [name.split(":")[0] for name in next(lines, (1, ""))[1].rstrip("\n").split("\t")]
    missing = {"user_id", "item_id", "timestamp"} - set(header)
    if missing:
        _fail(path, 1, f"header lacks {sorted(missing)} (expected user_id:token, item_id:token, timestamp:float)")
    user, item, time = (header.index(n) for n in ("user_id", "item_id", "timestamp"))
    for line_number, line in lines:
        fields = line.rstrip("\n").split("\t")
        if fields == [""]:
            continue
        if len(fields) != len(header):
            _fail(path, line_number, f"expected {len(header)} tab-separated fields, got {len(fields)}")
        events.setdefault(fields[user], []).append((_parse_time(path, line_number, fields[time]), fields[item]))
    return events


def _read_csv(path):
    events = {}
    for line_number, line in _lines(path):
        fields = next(csv.reader([line]), [])
        if not fields:
            continue
        if line_number == 1 and fields[:2] == ["user", "item"]:
            continue  # header
        if len(fields) not in (3, 4):
            _fail(path, line_number, f"expected user,item,timestamp[,rating], got {len(fields)} fields")
        events.setdefault(fields[0], []).append((_parse_time(path, line_number, fields[2]), fields[1]))
    return events


_READERS = {"sasrec": _read_sasrec, "sequences": _read_sequences, "inter": _read_inter, "csv": _read_csv}


def read_interactions(path: str | Path, format: str | None = None, min_count: int = 0) -> Interactions:
    """Reads `path` (format guessed from its suffix/first line when None). min_count > 0
    applies k-core filtering: users and items with fewer interactions are dropped, repeatedly,
    until every remaining one has at least min_count."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data: no such file {path}")
    format = format or guess_format(path)
    if format not in FORMATS:
        raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {format!r}")
    events = _READERS[format](path)
    # Stable sort by time: ties keep file order.
    raw = [[item for _, item in sorted(user_events, key=lambda e: e[0])] for user_events in events.values()]
    if min_count > 0:
        raw = _k_core(raw, min_count)
    ids = {}
    sequences = [[ids.setdefault(item, len(ids) + 1) for item in sequence] for sequence in raw if sequence]
    if not sequences:
        raise DataFormatError(f"{path}: no interactions (after filtering)" if min_count else f"{path}: empty")
    return Interactions(sequences, len(ids), str(path))


def _k_core(sequences, min_count):
    while True:
        counts = Counter(item for sequence in sequences for item in sequence)
        kept = [[i for i in s if counts[i] >= min_count] for s in sequences]
        kept = [s for s in kept if len(s) >= min_count]
        if kept == sequences:
            return kept
        sequences = kept
