"""The on-disk dataset format: a directory of Parquet shards plus ``_manifest.json``.

One row per 2D image. Columns (extend, never break):

=========  ========  ==========================================================
column     type      meaning
=========  ========  ==========================================================
id         string    unique within the dataset; rows are sorted by it
subject    string    pseudonymised subject (or grouping unit) id
split      string    ``train`` / ``val`` / ``test`` (synthetic rows: ``train``)
label      string    class name, null when unlabelled
image      binary    lossless image bytes (:data:`IMAGE_ENCODING`), ``(channels, height, width)``
mask       binary    lossless image bytes (uint8 class indices, one channel) or null
height     int32
width      int32
channels   int16
dtype      string    ``uint8`` or ``uint16``: the PNG's sample type
source     string    input uri, or ``generator-id@version`` for synthetic rows
seed       int64     per-shard seed of synthetic rows, null for real rows
=========  ========  ==========================================================

The quality stage appends float64 columns named ``q_<score>``.

Image cells are self-describing, so one reader decodes every dataset ever written:
``raw`` cells (the default, :data:`IMAGE_ENCODING`) are a 16-byte header (magic ``SMRW``,
version, dtype code, channels, height, width; little-endian) followed by the C-order
samples, and the Parquet file's zstd compresses them; ``png`` cells are PNG files
(compression level :data:`PNG_COMPRESS_LEVEL`), as written by earlier versions. Raw +
zstd was chosen by ``benchmarks/bench_synthesis.py``: on MNI152 slices and cGAN output
at 64x64 it is as small as PNG or smaller and ~10x cheaper to encode and write. The
manifest records the encoding the writer used (``image_encoding``).

Writes are deterministic (same rows -> byte-identical shards, no timestamps anywhere)
and atomic: shards are written to a staging directory next to the target and swapped
into place only when the manifest is complete, so a crashed run leaves the previous
version (or nothing) and never a half shard. A writer given a ``resume_key`` (a digest
of everything that determines the shards' bytes) keeps its staging directory
(``.<target>.partial-<key>``) when it is killed or fails, and a later writer with the
same key keeps the shards in it whose sha256 matches the one recorded when they were
written; temp files and unrecorded or mismatching shards are discarded. A disk that
fills up while writing is a one-line :class:`DataError` and leaves the previous version.

Readers trust nothing unchecked: :func:`verify_dataset` checks every shard's sha256, row
count and the manifest's class counts (the stages call it before using a dataset), and
a truncated or edited manifest or shard is a one-line :class:`DataError`. The module
lives in ``generators``, the lowest layer, because both the stages and the registry's
``generate`` write datasets.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import struct
import threading
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from generators.errors import DataError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST_NAME = "_manifest.json"
DONE_DIR = ".done"  # inside a resumable staging dir: one JSON record per completed shard
SPLITS = ("train", "val", "test")

BASE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("subject", pa.string()),
        ("split", pa.string()),
        ("label", pa.string()),
        ("image", pa.binary()),
        ("mask", pa.binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("channels", pa.int16()),
        ("dtype", pa.string()),
        ("source", pa.string()),
        ("seed", pa.int64()),
    ]
)
BASE_COLUMNS = tuple(BASE_SCHEMA.names)
PNG_COMPRESS_LEVEL = 1  # measured by benchmarks/bench_synthesis.py: level 6 is ~5% smaller, ~1.3x slower
IMAGE_ENCODING = "raw"  # how Row.to_record encodes image and mask cells: "raw" or "png"
RAW_MAGIC = b"SMRW"
_RAW_HEADER = struct.Struct("<4sBBHII")  # magic, version, dtype code, channels, height, width
_RAW_VERSION = 1
_RAW_DTYPES = {1: np.dtype("<u1"), 2: np.dtype("<u2")}
#: a volume cell (``preprocess.dims: 3``): the same raw samples with the volume's shape in
#: its header, so a row is self-describing (magic, version, dtype code, channels, depth,
#: height, width); ``height``/``width`` columns hold H and W, the manifest's provenance
#: ``volume_shape`` holds (D, H, W). Axes: canonical RAS voxel axes, D = x (left -> right),
#: H = y (posterior -> anterior), W = z (inferior -> superior) (tasks.config.PreprocessSpec)
VOLUME_MAGIC = b"SMV3"
_VOLUME_HEADER = struct.Struct("<4sBBHIII")


class ImageDecodeError(DataError, ValueError):
    """An image cell that cannot be decoded (a ValueError too, like Pillow's errors)."""


# --------------------------------------------------------------------------- images
def encode_png(image: np.ndarray) -> bytes:
    """Encode a ``(C, H, W)`` uint8/uint16 array (C = 1 or 3) as lossless PNG bytes."""
    _check_image(image)
    array = image[0] if image.shape[0] == 1 else np.moveaxis(image, 0, -1)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def _check_image(image: np.ndarray) -> None:
    if image.ndim == 4 and image.shape[0] == 1 and image.dtype in (np.uint8, np.uint16):
        return  # a grey volume (1, D, H, W): raw encoding only
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise DataError(
            f"expected an image of shape (C, H, W) with C in (1, 3), got {image.shape}; "
            "convert to grey or RGB channel-first first"
        )
    if image.dtype not in (np.uint8, np.uint16):
        raise DataError(f"expected uint8 or uint16 pixels, got {image.dtype}; quantise first")
    if image.shape[0] == 3 and image.dtype != np.uint8:
        raise DataError("expected 8-bit samples for RGB images, got uint16; use grey or 8-bit")


def encode_raw(image: np.ndarray) -> bytes:
    """Encode a ``(C, H, W)`` uint8/uint16 image, or a ``(1, D, H, W)`` volume, as a
    ``raw`` cell: header (with the shape) + samples."""
    _check_image(image)
    code = 1 if image.dtype == np.uint8 else 2
    if image.ndim == 4:
        channels, depth, height, width = image.shape
        header = _VOLUME_HEADER.pack(VOLUME_MAGIC, _RAW_VERSION, code, channels, depth, height, width)
        return header + np.ascontiguousarray(image, dtype=_RAW_DTYPES[code]).tobytes()
    channels, height, width = image.shape
    header = _RAW_HEADER.pack(RAW_MAGIC, _RAW_VERSION, code, channels, height, width)
    return header + np.ascontiguousarray(image, dtype=_RAW_DTYPES[code]).tobytes()


def encode_image(image: np.ndarray, encoding: str | None = None) -> bytes:
    """Encode a ``(C, H, W)`` uint8/uint16 array as ``encoding`` (``raw`` or ``png``;
    default :data:`IMAGE_ENCODING`)."""
    encoding = IMAGE_ENCODING if encoding is None else encoding
    if encoding == "raw" or image.ndim == 4:  # PNG holds no volume: volumes are always raw
        return encode_raw(image)
    if encoding == "png":
        return encode_png(image)
    raise DataError(f"unknown image encoding {encoding!r}; expected 'raw' or 'png'")


def _decode_raw(data: bytes) -> np.ndarray:
    if len(data) < _RAW_HEADER.size:
        raise ImageDecodeError(f"raw image cell of {len(data)} bytes is shorter than its header; the data is corrupt")
    _, version, code, channels, height, width = _RAW_HEADER.unpack_from(data)
    dtype = _RAW_DTYPES.get(code)
    expected = _RAW_HEADER.size + channels * height * width * (dtype.itemsize if dtype else 0)
    if version != _RAW_VERSION or dtype is None or len(data) != expected:
        raise ImageDecodeError(
            f"raw image cell (version {version}, dtype code {code}, {len(data)} bytes) does not match its "
            f"header (expected version {_RAW_VERSION}, {expected} bytes); the data is corrupt or from a newer synthmed"
        )
    pixels = np.frombuffer(data, dtype=dtype, offset=_RAW_HEADER.size).reshape(channels, height, width)
    return pixels.astype(dtype.newbyteorder("="))  # a writable native-order copy


def _decode_volume(data: bytes) -> np.ndarray:
    if len(data) < _VOLUME_HEADER.size:
        raise ImageDecodeError(f"volume cell of {len(data)} bytes is shorter than its header; the data is corrupt")
    _, version, code, channels, depth, height, width = _VOLUME_HEADER.unpack_from(data)
    dtype = _RAW_DTYPES.get(code)
    expected = _VOLUME_HEADER.size + channels * depth * height * width * (dtype.itemsize if dtype else 0)
    if version != _RAW_VERSION or dtype is None or len(data) != expected:
        raise ImageDecodeError(
            f"volume cell (version {version}, dtype code {code}, {len(data)} bytes) does not match its header "
            f"(expected version {_RAW_VERSION}, {expected} bytes); the data is corrupt or from a newer synthmed"
        )
    voxels = np.frombuffer(data, dtype=dtype, offset=_VOLUME_HEADER.size).reshape(channels, depth, height, width)
    return voxels.astype(dtype.newbyteorder("="))


def cell_shape(data: bytes) -> tuple[int, ...]:
    """The shape a cell decodes to, from its header alone: ``(C, H, W)`` for a raw image,
    ``(C, D, H, W)`` for a volume; PNG cells are decoded to find out."""
    if data[:4] == VOLUME_MAGIC and len(data) >= _VOLUME_HEADER.size:
        return tuple(int(v) for v in _VOLUME_HEADER.unpack_from(data)[3:])
    if data[:4] == RAW_MAGIC and len(data) >= _RAW_HEADER.size:
        return tuple(int(v) for v in _RAW_HEADER.unpack_from(data)[3:])
    return tuple(decode_image(data).shape)


def decode_image(data: bytes) -> np.ndarray:
    """Decode an image cell (``raw`` or PNG) to a ``(C, H, W)`` uint8 or uint16 array, or a
    volume cell to ``(C, D, H, W)``.

    Raises :class:`ImageDecodeError` for a corrupt raw cell, and Pillow's ``OSError``
    (``UnidentifiedImageError``) / ``ValueError`` / ``SyntaxError`` for bytes that are
    neither a raw cell nor a readable PNG."""
    if data[:4] == RAW_MAGIC:
        return _decode_raw(data)
    if data[:4] == VOLUME_MAGIC:
        return _decode_volume(data)
    with Image.open(io.BytesIO(data)) as img:
        array = np.asarray(img)
    if array.dtype == np.int32 or array.dtype == np.uint32:  # PIL mode "I" for 16-bit
        array = array.astype(np.uint16)
    if array.ndim == 2:
        return array[None]
    return np.moveaxis(array, -1, 0)


decode_png = decode_image  # the name earlier versions used; it decodes both encodings


def to_unit_float(image: np.ndarray) -> np.ndarray:
    """Map uint8/uint16 pixels to float32 in [0, 1] (divides by the dtype's maximum)."""
    return image.astype(np.float32) / float(np.iinfo(image.dtype).max)


def from_unit_float(image: np.ndarray, dtype: str) -> np.ndarray:
    """Clip float pixels to [0, 1] and quantise to ``dtype`` (``uint8`` or ``uint16``)."""
    info = np.iinfo(np.dtype(dtype))
    clipped = np.clip(np.nan_to_num(image, nan=0.0), 0.0, 1.0)
    return np.rint(clipped * info.max).astype(dtype)


# --------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class Row:
    """One dataset row before encoding. ``image``: (C, H, W) uint8/uint16; ``mask``: (H, W)
    uint8. A volume row: ``image`` (1, D, H, W), ``mask`` (D, H, W)."""

    id: str
    subject: str
    split: str
    label: str | None
    image: np.ndarray
    source: str
    mask: np.ndarray | None = None
    seed: int | None = None

    def to_record(self) -> dict[str, Any]:
        """The row as a record; image and mask encoded as :data:`IMAGE_ENCODING`."""
        mask = None if self.mask is None else encode_image(self.mask.astype(np.uint8)[None])
        return {
            "id": self.id,
            "subject": self.subject,
            "split": self.split,
            "label": self.label,
            "image": encode_image(self.image),
            "mask": mask,
            "height": int(self.image.shape[-2]),
            "width": int(self.image.shape[-1]),
            "channels": int(self.image.shape[0]),
            "dtype": str(self.image.dtype),
            "source": self.source,
            "seed": self.seed,
        }


def records_to_table(records: Sequence[dict[str, Any]], schema: pa.Schema = BASE_SCHEMA) -> pa.Table:
    """Build an Arrow table with the fixed column order and types."""
    columns = {name: [r.get(name) for r in records] for name in schema.names}
    return pa.table(columns, schema=schema)


# --------------------------------------------------------------------------- files
def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write one shard deterministically: temp file in the same directory, flushed to
    disk, then renamed, so the name only ever points at a complete file."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        pq.write_table(table, tmp, compression="zstd", use_dictionary=["split", "label", "dtype", "source"])
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(data: Any, path: Path, *, sort_keys: bool = True) -> None:
    """Write JSON atomically: keys sorted (stable bytes), or in the dict's own order when
    ``sort_keys`` is False (stable when the writer builds its dict in a fixed order)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    """Whether a process with this pid exists (signal 0 probes without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def replace_dir(staging: Path, target: Path) -> None:
    """Replace ``target`` by ``staging`` with two renames; the old version is removed last,
    and put back when the second rename fails."""
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex}")
    if target.exists():
        os.replace(target, old)
    try:
        os.replace(staging, target)
    except OSError:
        if old.exists():
            os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def disk_full_is_one_line(target: Path) -> Iterator[None]:
    """Turn "no space left" (``ENOSPC``, ``EDQUOT``) while writing ``target`` into a
    one-line :class:`DataError`; other ``OSError`` pass unchanged."""
    try:
        yield
    except OSError as exc:
        if exc.errno in NO_SPACE_ERRNOS:
            raise DataError(f"no space left on device writing {target}; free space and rerun") from exc
        raise


def class_counts(table: pa.Table) -> dict[str, dict[str, int]]:
    """``{split: {label: count}}`` with sorted keys; unlabelled rows count under ``""``."""
    counts: dict[str, Counter[str]] = {}
    for split, label in zip(table.column("split").to_pylist(), table.column("label").to_pylist(), strict=True):
        counts.setdefault(split, Counter())[label or ""] += 1
    return {s: dict(sorted(c.items())) for s, c in sorted(counts.items())}


def write_staged_shard(
    table: pa.Table, staging: Path, index: int, *, schema: pa.Schema = BASE_SCHEMA, recorded: bool = True
) -> dict[str, Any]:
    """Write ``table`` as shard ``index`` (``part-<index>.parquet``) of a
    :class:`DatasetWriter`'s staging dir, atomically (temp file, then rename), and, when
    ``recorded``, its completion record under ``.done/`` (what a resume or
    :meth:`DatasetWriter.adopt_shard` reads). Returns the record: file, rows, sha256 and
    class counts. Any process that sees ``staging`` may call it, one call per index."""
    table = table.select(schema.names).cast(schema)
    name = DatasetWriter._shard_name(index)
    path = Path(staging) / name
    write_parquet_atomic(table, path)
    record = {"file": name, "rows": table.num_rows, "sha256": sha256_file(path), "class_counts": class_counts(table)}
    if recorded:
        write_json_atomic(record, Path(staging) / DONE_DIR / f"{name}.json")
    return record


class DatasetWriter:
    """Stream tables into shards of ``shard_rows`` rows; ``close()`` writes the manifest.

    Use as a context manager. Rows must arrive in final order (sorted by id) so that the
    same input gives the same shards. On an exception nothing replaces the target.

    ``resume_key`` (8-64 lowercase hex chars) makes the writer resumable: the staging
    directory is ``.<target>.partial-<resume_key>`` and survives a crash or an exception;
    staging directories of the same target with another key are removed. The caller
    then asks :meth:`resume_shard` before making each shard, and skips making it when
    the answer is True. The key must change whenever the shards' bytes would.
    """

    def __init__(
        self,
        target: Path,
        *,
        shard_rows: int = 1024,
        schema: pa.Schema = BASE_SCHEMA,
        provenance: dict[str, Any] | None = None,
        resume_key: str | None = None,
    ) -> None:
        if shard_rows < 1:
            raise DataError(f"expected shard_rows >= 1, got {shard_rows}")
        if resume_key is not None and not re.fullmatch(r"[0-9a-f]{8,64}", resume_key):
            raise DataError(f"expected resume_key of 8-64 lowercase hex chars, got {resume_key!r}")
        self.target = Path(target)
        self.schema = schema
        self.shard_rows = shard_rows
        self.provenance = provenance or {}
        self.resume_key = resume_key
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._shards: list[dict[str, Any]] = []
        self._counts: dict[str, Counter[str]] = {}
        self._resumable: dict[str, dict[str, Any]] = {}
        self.resumed = 0  # shards taken over from an interrupted run
        if resume_key is None:
            self._remove_orphaned_staging()
            self.staging = self.target.with_name(f".{self.target.name}.staging-{os.getpid()}-{uuid.uuid4().hex}")
            self.staging.mkdir()
        else:
            self.staging = self.target.with_name(f".{self.target.name}.partial-{resume_key}")
            self._prepare_partial()

    def _remove_orphaned_staging(self) -> None:
        """Remove staging dirs of this target left by killed processes (their pid, the
        first part of the name, is no longer running); a live writer's dir is kept."""
        for other in self.target.parent.glob(f".{self.target.name}.staging-*"):
            pid = other.name.rsplit(".staging-", 1)[1].split("-", 1)[0]
            if not pid.isdigit() or not _process_alive(int(pid)):
                shutil.rmtree(other, ignore_errors=True)

    # ------------------------------------------------------------------ resume
    def _prepare_partial(self) -> None:
        """Remove other keys' partial dirs; keep only verified shards in ours."""
        for other in self.target.parent.glob(f".{self.target.name}.partial-*"):
            if other != self.staging:
                shutil.rmtree(other, ignore_errors=True)
        done = self.staging / DONE_DIR
        done.mkdir(parents=True, exist_ok=True)
        for record_path in sorted(done.glob("part-*.json")):
            try:
                record = json.loads(record_path.read_text())
                shard = self.staging / record["file"]
                ok = (
                    record_path.name == f"{record['file']}.json"
                    and shard.is_file()
                    and sha256_file(shard) == record["sha256"]
                )
            except (OSError, ValueError, KeyError, TypeError):
                ok = False
            if ok:
                self._resumable[record["file"]] = record
            else:
                record_path.unlink(missing_ok=True)
        for entry in self.staging.iterdir():
            if entry.name == DONE_DIR or entry.name in self._resumable:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)  # temp files, unrecorded shards, a stale manifest
        if self._resumable:
            log.info("%s: %d completed shard(s) found to resume from", self.target.name, len(self._resumable))

    def is_resumable(self, index: int) -> bool:
        """Whether shard ``index`` is kept, verified, from an interrupted run; only a peek:
        :meth:`resume_shard` takes it over when its turn comes."""
        return self._shard_name(index) in self._resumable

    def resume_shard(self) -> bool:
        """True when the next shard already exists, complete and verified, from an
        interrupted run with the same ``resume_key``; it is then counted in as if
        written now. False (always, without a key) means: make and write it."""
        if self.resume_key is None:
            return False
        if self._pending_rows:
            raise DataError("resume_shard() needs whole shards; write shard_rows rows per table")
        name = self._shard_name(len(self._shards))
        record = self._resumable.pop(name, None)
        if record is None:
            return False
        self._count_in(record)
        self.resumed += 1
        return True

    # ------------------------------------------------------------------ writing
    @staticmethod
    def _shard_name(index: int) -> str:
        return f"part-{index:05d}.parquet"

    def write_records(self, records: Sequence[dict[str, Any]]) -> None:
        if records:
            self.write_table(records_to_table(records, self.schema))

    def write_table(self, table: pa.Table) -> None:
        table = table.select(self.schema.names).cast(self.schema)
        self._pending.append(table)
        self._pending_rows += table.num_rows
        while self._pending_rows >= self.shard_rows:
            self._flush(self.shard_rows)

    def _flush(self, rows: int) -> None:
        with disk_full_is_one_line(self.target):
            self._flush_shard(rows)

    def _flush_shard(self, rows: int) -> None:
        merged = pa.concat_tables(self._pending)
        shard, rest = merged.slice(0, rows), merged.slice(rows)
        name = self._shard_name(len(self._shards))
        if self.resume_key is not None:
            self._resumable.pop(name, None)
        record = write_staged_shard(
            shard, self.staging, len(self._shards), schema=self.schema, recorded=self.resume_key is not None
        )
        self._count_in(record)
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows = rest.num_rows

    def _count_in(self, record: dict[str, Any]) -> None:
        for split, counts in record["class_counts"].items():
            self._counts.setdefault(split, Counter()).update(counts)
        self._shards.append({"file": record["file"], "rows": record["rows"], "sha256": record["sha256"]})

    def adopt_shard(self, record: dict[str, Any]) -> None:
        """Count in the next shard, written into :attr:`staging` by another process with
        :func:`write_staged_shard` (e.g. a Dask worker); its file is checked against
        ``record`` (name, sha256) as this process sees it. Needs a ``resume_key``."""
        name = self._shard_name(len(self._shards))
        if self.resume_key is None or self._pending_rows:
            raise DataError("adopt_shard() needs a resumable writer and whole shards")
        path = self.staging / name
        if record.get("file") != name:
            raise DataError(f"{self.target}: expected shard {name} next, got {record.get('file')!r}; rerun the stage")
        if not path.is_file() or sha256_file(path) != record.get("sha256"):
            raise DataError(
                f"{path}: the shard a worker reported is missing or differs here; every worker must write to "
                "the same project directory this process reads (a shared filesystem)"
            )
        self._resumable.pop(name, None)
        self._count_in(record)

    def close(self) -> dict[str, Any]:
        """Write the last shard and the manifest, then swap the staging dir into place.
        On failure the previous dataset is untouched (see :meth:`abort`)."""
        if self._pending_rows:
            self._flush(self._pending_rows)
        with disk_full_is_one_line(self.target):
            return self._finish()

    def _finish(self) -> dict[str, Any]:
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "rows": sum(s["rows"] for s in self._shards),
            "shards": self._shards,
            "columns": list(self.schema.names),
            "class_counts": {s: dict(sorted(c.items())) for s, c in sorted(self._counts.items())},
            "provenance": self.provenance,
            "image_encoding": IMAGE_ENCODING,
        }
        if self.resume_key is not None:
            for name in sorted(self._resumable):  # beyond this run's shards: not ours to keep
                log.warning("%s: discarding %s, not part of this run", self.target.name, name)
                (self.staging / name).unlink(missing_ok=True)
            for stray in self.staging.glob(".*.tmp"):  # a writer killed mid-shard (another process)
                stray.unlink(missing_ok=True)
        # the manifest first: a failed write (disk full) leaves the .done records for a resume
        write_json_atomic(manifest, self.staging / MANIFEST_NAME)
        if self.resume_key is not None:
            shutil.rmtree(self.staging / DONE_DIR)
        replace_dir(self.staging, self.target)
        return manifest

    def abort(self) -> None:
        """Discard the staging dir; a resumable writer keeps its completed, recorded shards
        for the next run (temp files, unrecorded shards and a manifest go)."""
        if self.resume_key is None:
            shutil.rmtree(self.staging, ignore_errors=True)
            return
        if self.staging.is_dir():
            for entry in self.staging.iterdir():
                recorded = (self.staging / DONE_DIR / f"{entry.name}.json").is_file()
                if entry.is_file() and not recorded:
                    entry.unlink(missing_ok=True)

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.close()
        except BaseException:
            self.abort()
            raise


def write_dataset(
    target: Path,
    records: Iterable[dict[str, Any]],
    *,
    shard_rows: int = 1024,
    schema: pa.Schema = BASE_SCHEMA,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``records`` (already in final order) as a dataset; returns the manifest."""
    writer = DatasetWriter(target, shard_rows=shard_rows, schema=schema, provenance=provenance)
    with writer:
        batch: list[dict[str, Any]] = []
        for record in records:
            batch.append(record)
            if len(batch) >= shard_rows:
                writer.write_records(batch)
                batch = []
        writer.write_records(batch)
    return read_manifest(target)


# --------------------------------------------------------------------------- reading
REWRITE_HINT = "rerun the stage that wrote this dataset"
_SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\.parquet")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def read_manifest(dataset: Path, *, fix: str = REWRITE_HINT) -> dict[str, Any]:
    """Load and check the shape of ``_manifest.json`` (a list of shards, each with a plain
    file name, a row count and a sha256; class counts). A missing, truncated or edited
    manifest is a one-line :class:`DataError` that ends with ``fix``."""
    path = Path(dataset) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(
            f"{dataset}: expected a synthmed dataset (Parquet shards + {MANIFEST_NAME}), "
            "found none; run the stage that writes it first"
        )
    try:
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DataError(f"{path}: unreadable ({type(exc).__name__}: truncated or edited); {fix}") from exc
    problem = _manifest_problem(manifest)
    if problem:
        raise DataError(f"{path}: {problem} (truncated or edited); {fix}")
    return manifest


def _manifest_problem(manifest: Any) -> str | None:
    """What is wrong with a manifest's structure, or None."""
    if not isinstance(manifest, dict):
        return f"expected a JSON object, got {type(manifest).__name__}"
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        return "expected a list under 'shards'"
    for shard in shards:
        ok = (
            isinstance(shard, dict)
            and isinstance(shard.get("file"), str)
            and _SHARD_NAME.fullmatch(shard["file"]) is not None
            and isinstance(shard.get("rows"), int)
            and shard["rows"] >= 0
            and isinstance(shard.get("sha256"), str)
            and _SHA256.fullmatch(shard["sha256"]) is not None
        )
        if not ok:
            return f"expected shard entries {{file: part-NNNNN.parquet, rows, sha256}}, got {str(shard)[:80]!r}"
    counts = manifest.get("class_counts")
    if not isinstance(counts, dict) or not all(
        isinstance(c, dict) and all(isinstance(n, int) for n in c.values()) for c in counts.values()
    ):
        return "expected {split: {label: count}} under 'class_counts'"
    if manifest.get("rows") != sum(s["rows"] for s in shards):
        return f"'rows' is {manifest.get('rows')!r}, the shards hold {sum(s['rows'] for s in shards)}"
    return None


# Datasets verified in this process, by resolved path: the (size, mtime_ns, inode) of the
# manifest and of every shard when they last matched. Any rewrite changes them; a full
# check hashes every shard byte (sha256 at ~560 MB/s on the 2-core dev machine, ~2 s per
# GB; the demo datasets take 1-30 ms), and a stage run checks its inputs several times.
_VERIFIED: dict[Path, tuple[tuple[int, int, int], ...]] = {}
_VERIFIED_LOCK = threading.Lock()


def _file_stamp(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return (stat.st_size, stat.st_mtime_ns, stat.st_ino)


def verify_dataset(dataset: Path, *, fix: str = REWRITE_HINT) -> dict[str, Any]:
    """Check a dataset before it is trusted; returns the manifest.

    Every shard must exist, match the sha256 recorded in the manifest, hold the recorded
    number of rows, and the manifest's ``class_counts`` must equal the shards' ``split`` /
    ``label`` columns. Anything else is a one-line :class:`DataError` naming the file and
    ending with ``fix``. A dataset whose files are unchanged (size, mtime, inode) since it
    was last verified in this process is not hashed again."""
    dataset = Path(dataset)
    manifest = read_manifest(dataset, fix=fix)
    files = [dataset / MANIFEST_NAME, *(dataset / s["file"] for s in manifest["shards"])]
    for path in files[1:]:
        if not path.is_file():
            raise DataError(f"{path}: shard listed in {MANIFEST_NAME} is missing; {fix}")
    key = dataset.resolve()
    stamps = tuple(_file_stamp(p) for p in files)
    with _VERIFIED_LOCK:
        if _VERIFIED.get(key) == stamps:
            return manifest
    counts: dict[str, Counter[str]] = {}
    for shard, path in zip(manifest["shards"], files[1:], strict=True):
        if sha256_file(path) != shard["sha256"]:
            raise DataError(f"{path}: sha256 does not match {MANIFEST_NAME} (corrupted or edited); {fix}")
        try:
            table = pq.read_table(path, columns=["split", "label"])
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"{path}: unreadable shard ({type(exc).__name__}); {fix}") from exc
        if table.num_rows != shard["rows"]:
            raise DataError(f"{path}: {table.num_rows} rows, {MANIFEST_NAME} says {shard['rows']}; {fix}")
        for split, c in class_counts(table).items():
            counts.setdefault(split, Counter()).update(c)
    actual = {s: dict(sorted(c.items())) for s, c in sorted(counts.items())}
    recorded = {s: dict(sorted(c.items())) for s, c in sorted(manifest["class_counts"].items()) if c}
    if actual != recorded:
        raise DataError(
            f"{dataset / MANIFEST_NAME}: class_counts {recorded} do not match the shards {actual} "
            f"(edited or inconsistent); {fix}"
        )
    with _VERIFIED_LOCK:
        _VERIFIED[key] = stamps
    return manifest


def dataset_digest(dataset: Path) -> str:
    """A short content id of a dataset: sha256 over its shards' sha256 values."""
    manifest = read_manifest(dataset)
    digest = hashlib.sha256()
    for shard in manifest["shards"]:
        digest.update(shard["sha256"].encode())
    return digest.hexdigest()[:16]


def iter_tables(
    dataset: Path, columns: Sequence[str] | None = None, splits: Sequence[str] | None = None
) -> Iterator[pa.Table]:
    """Yield one table per shard (bounded memory), optionally filtered by split."""
    manifest = read_manifest(dataset)
    for shard in manifest["shards"]:
        cols = list(columns) if columns else None
        if cols and splits and "split" not in cols:
            cols = cols + ["split"]
        path = Path(dataset) / shard["file"]
        try:
            table = pq.read_table(path, columns=cols)
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"{path}: unreadable shard ({type(exc).__name__}); {REWRITE_HINT}") from exc
        if splits:
            mask = np.isin(np.asarray(table.column("split").to_pylist(), dtype=object), list(splits))
            table = table.filter(pa.array(mask))
        yield table


def read_table(dataset: Path, columns: Sequence[str] | None = None, splits: Sequence[str] | None = None) -> pa.Table:
    """The whole dataset (or some splits/columns) as one table."""
    tables = list(iter_tables(dataset, columns, splits))
    if not tables:
        names = list(columns) if columns else BASE_SCHEMA.names
        return BASE_SCHEMA.empty_table().select([n for n in names if n in BASE_COLUMNS])
    return pa.concat_tables(tables, promote_options="default")


@dataclass(frozen=True)
class ImageArrays:
    """Decoded images of a table. ``images``: float32 (N, C, H, W) in [0, 1];
    ``masks``: int64 (N, H, W) or None; ``labels``: list of class names (or None).
    Volumes: images (N, 1, D, H, W), masks (N, D, H, W) (every row of one shape)."""

    images: np.ndarray
    masks: np.ndarray | None
    labels: list[str | None]
    ids: list[str]


def decode_table(table: pa.Table) -> ImageArrays:
    """Decode the ``image`` (and ``mask`` where every row has one) columns of a table."""
    blobs = table.column("image").to_pylist()
    images = [to_unit_float(decode_image(b)) for b in blobs]
    shapes = sorted({image.shape for image in images})
    if len(shapes) > 1:
        raise DataError(
            f"expected every row of one shape to stack them, got {len(shapes)} shapes ({shapes[0]} ... {shapes[-1]}); "
            "read one split at a time (volume datasets may store val/test at another size than train)"
        )
    stacked = np.stack(images).astype(np.float32) if images else np.zeros((0, 1, 1, 1), np.float32)
    masks = None
    if "mask" in table.column_names:
        mask_blobs = table.column("mask").to_pylist()
        if mask_blobs and all(m is not None for m in mask_blobs):
            masks = np.stack([decode_image(m)[0] for m in mask_blobs]).astype(np.int64)
    labels = table.column("label").to_pylist() if "label" in table.column_names else [None] * len(blobs)
    ids = table.column("id").to_pylist() if "id" in table.column_names else [str(i) for i in range(len(blobs))]
    return ImageArrays(images=stacked, masks=masks, labels=labels, ids=ids)
