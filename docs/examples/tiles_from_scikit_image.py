"""Make the README tutorial's folder: class sub-folders of tiles cut from two medical
images that scikit-image ships in its wheel (read from the wheel: nothing is installed).

    pip download scikit-image --no-deps -d /tmp/skimage-wheel
    python docs/examples/tiles_from_scikit_image.py /tmp/skimage-wheel /tmp/tiles

``ihc/``: 64 tiles of 64x64 from ``ihc.png`` (immunohistochemistry, 512x512 RGB);
``fundus/``: 64 tiles of 112x112 from the centre of ``retina.jpg`` (a fundus photograph,
1411x1411 RGB). Tiles of one image are not independent subjects: a real study would group
them (``source.subject_regex``); here each tile counts as one.
"""

from __future__ import annotations

import io
import sys
import zipfile
from pathlib import Path

from PIL import Image

SOURCES = {  # label: (file in the wheel, crop box, tile side)
    "ihc": ("skimage/data/ihc.png", (0, 0, 512, 512), 64),
    "fundus": ("skimage/data/retina.jpg", (256, 256, 1152, 1152), 112),
}


def main(wheel_dir: Path, out: Path) -> None:
    wheel = zipfile.ZipFile(next(wheel_dir.glob("scikit_image-*.whl")))
    for label, (name, box, side) in SOURCES.items():
        image = Image.open(io.BytesIO(wheel.read(name))).convert("RGB").crop(box)
        (out / label).mkdir(parents=True, exist_ok=True)
        count = 0
        for top in range(0, image.height - side + 1, side):
            for left in range(0, image.width - side + 1, side):
                tile = image.crop((left, top, left + side, top + side))
                tile.save(out / label / f"{label}_{top:04d}_{left:04d}.png")
                count += 1
        print(f"{label}: {count} tiles of {side}x{side}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
