"""Image cells: ``raw`` (header + samples, compressed by Parquet's zstd) is the default
encoding; PNG cells written by earlier versions still decode; corrupt cells give a clear
error that callers catching Pillow's ``ValueError`` also catch; the manifest records the
encoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from generators.errors import DataError
from generators.shards import (
    IMAGE_ENCODING,
    RAW_MAGIC,
    ImageDecodeError,
    Row,
    decode_image,
    decode_png,
    decode_table,
    encode_image,
    encode_png,
    read_manifest,
    read_table,
    write_dataset,
)

RNG = np.random.default_rng(0)
IMAGES = {
    "grey8": RNG.integers(0, 256, (1, 7, 5), dtype=np.uint8),
    "grey16": RNG.integers(0, 65536, (1, 4, 6), dtype=np.uint16),
    "rgb8": RNG.integers(0, 256, (3, 5, 5), dtype=np.uint8),
}


@pytest.mark.parametrize("encoding", ["raw", "png"])
@pytest.mark.parametrize("name", sorted(IMAGES))
def test_both_encodings_round_trip_losslessly(encoding: str, name: str) -> None:
    image = IMAGES[name]
    data = encode_image(image, encoding)
    assert data.startswith(RAW_MAGIC if encoding == "raw" else b"\x89PNG")
    for decode in (decode_image, decode_png):  # the old name decodes both
        back = decode(data)
        assert back.dtype == image.dtype and back.shape == image.shape
        assert np.array_equal(back, image)
        if encoding == "raw":
            back[0, 0, 0] ^= 1  # a writable copy, not a read-only view of the cell's bytes
    assert encode_png(image) == encode_image(image, "png")


def test_default_rows_use_the_raw_encoding_and_the_manifest_says_so(tmp_path: Path) -> None:
    assert IMAGE_ENCODING == "raw"
    mask = (IMAGES["grey8"][0] > 128).astype(np.uint8)
    row = Row(id="a", subject="s", split="train", label="x", image=IMAGES["grey8"], source="t", mask=mask)
    legacy = {**row.to_record(), "id": "b", "image": encode_png(IMAGES["grey8"]), "mask": encode_png(mask[None])}
    manifest = write_dataset(tmp_path / "d", [row.to_record(), legacy])
    assert manifest["image_encoding"] == "raw" == read_manifest(tmp_path / "d")["image_encoding"]
    table = read_table(tmp_path / "d")
    assert table.column("image")[0].as_py().startswith(RAW_MAGIC)
    arrays = decode_table(table)  # a table mixing raw and PNG cells decodes
    expected = IMAGES["grey8"].astype(np.float32) / 255
    assert np.array_equal(arrays.images[0], expected) and np.array_equal(arrays.images[1], expected)
    assert np.array_equal(arrays.masks[0], mask) and np.array_equal(arrays.masks[1], mask)


def test_corrupt_cells_raise_a_one_line_error() -> None:
    good = encode_image(IMAGES["grey8"], "raw")
    for bad in (good[:-1], good + b"\0", RAW_MAGIC + b"\1", good[:4] + b"\x09" + good[5:]):
        with pytest.raises(ImageDecodeError, match="corrupt") as info:
            decode_image(bad)
        assert isinstance(info.value, ValueError) and isinstance(info.value, DataError)
        assert "\n" not in str(info.value)
    with pytest.raises(OSError):  # neither raw nor PNG: Pillow's UnidentifiedImageError
        decode_image(b"this is not an image")


def test_bad_arrays_are_refused_whatever_the_encoding() -> None:
    for encoding in ("raw", "png"):
        with pytest.raises(DataError, match="uint8 or uint16"):
            encode_image(np.zeros((1, 2, 2), np.float32), encoding)
        with pytest.raises(DataError, match=r"\(C, H, W\)"):
            encode_image(np.zeros((2, 2), np.uint8), encoding)
        with pytest.raises(DataError, match="8-bit"):
            encode_image(np.zeros((3, 2, 2), np.uint16), encoding)
    with pytest.raises(DataError, match="expected 'raw' or 'png'"):
        encode_image(IMAGES["grey8"], "jpeg")
