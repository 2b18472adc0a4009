"""medigan model packages: run a downloaded medigan model, in a subprocess, as a synthmed generator.

medigan (https://github.com/RichardObi/medigan, 1.0.0) publishes each model as a zip on
Zenodo: the model's package folder archived from its root (``shutil.make_archive(...,
root_dir=package_folder)``), so ``__init__.py``, the weights ``<model_name><extension>``
and any helper modules sit at the top of the zip; medigan also accepts them one folder
down, in ``<package_name>/``. medigan's ``global.json`` entry says how to call it::

    "execution": {"package_name": "00001_DCGAN_MMG_CALC_ROI", "model_name": "DCGAN", "extension": ".pt",
                  "image_size": [128, 128], "dependencies": [...],
                  "generate_method": {"name": "generate",
                                      "args": {"base": ["model_file", "num_samples", "output_path", "save_images"],
                                               "custom": {"image_size": 128}}}}

and medigan calls ``generate(model_file=<weights path>, num_samples=n, output_path=<dir>,
save_images=<bool>, **custom)``, which returns a list of numpy images (``save_images``
False) or writes image files into ``output_path``.

synthmed never imports the package: :class:`MediganGenerator` runs it with
``python -I`` in a child process (``network.python``, default this interpreter), with
the package extracted into a private temporary folder and the working directory a fresh
temporary folder. Image ``i`` of ``generate(n, seed)`` is one call ``generate(num_samples=1)``
after seeding ``random``, ``numpy`` and (when the package imported it) ``torch`` with
``SeedSequence([seed, i, 0])``, so it depends on ``(seed, i)`` only, as the conformance
check's ``seed_stream`` asks. The child returns each image as ``.npy`` (or leaves the files
the package wrote), and this process reads them back as float32 ``(N, C, H, W)`` in [0, 1]:
integer images are divided by their dtype's maximum, float images mapped from
``network.output_range`` (default: they must already lie in [0, 1]).

Running a package runs its code: loading a ``medigan`` card needs ``allow_code=True``
(CLI ``--allow-code``), like TorchScript. The zip is the card's weights file
(``weights.format: zip``), so its sha256 is verified before every extraction.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import weakref
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import numpy as np
from pydantic import ValidationError

from generators.card import ModelCard, card_error, save_card
from generators.contract import GeneratedBatch
from generators.errors import ConfigError, GeneratorError
from generators.safe_paths import safe_join
from generators.seed_stream import indices
from generators.shards import sha256_file
from generators.weights import read_verified

MAX_MEMBERS = 10_000
MAX_UNPACKED_BYTES = 8 << 30  # 8 GiB: the largest medigan packages are ~1 GiB
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".npy")
PACKAGE_VERSION_SUFFIX = "+package"  # keeps a runnable import apart from import-medigan's search-only card

#: the child process: stdlib + numpy; argv[1] is a JSON spec written by :func:`_run`
RUNNER = r"""
import importlib, json, random, sys
from pathlib import Path
import numpy as np
spec = json.loads(Path(sys.argv[1]).read_text())
sys.path.insert(0, spec["parent"])
module = importlib.import_module(spec["module"])
generate = getattr(module, spec["function"])
torch = sys.modules.get("torch")
out = Path(spec["out"])
for k, i in enumerate(spec["indices"]):
    state = int(np.random.SeedSequence([spec["seed"], i, 0]).generate_state(1)[0])
    random.seed(state)
    np.random.seed(state)
    torch = torch or sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(state)
    folder = out / f"{k:07d}"
    folder.mkdir()
    kwargs = dict(spec["custom"])
    kwargs.update(model_file=spec["model_file"], num_samples=1, output_path=str(folder) + "/",
                  save_images=spec["save_images"])
    result = generate(**kwargs)
    if result is not None and not spec["save_images"]:
        item = result[0] if isinstance(result, (list, tuple)) else result
        if isinstance(item, (list, tuple)):  # (image, mask) pairs: keep the image
            item = item[0]
        if hasattr(item, "detach"):
            item = item.detach().cpu().numpy()
        np.save(folder / "image.npy", np.asarray(item), allow_pickle=False)
"""


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else "..." + text[-(limit - 3) :]


# ---------------------------------------------------------------------------------------- the package


def read_package(zip_bytes: bytes, origin: str) -> zipfile.ZipFile:
    """The zip, refused (one-line GeneratorError) when it is not one, has absolute or ``..``
    member names, links, too many members or unpacks to more than 8 GiB."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(zip_bytes))
    except zipfile.BadZipFile:
        raise GeneratorError(
            f"{origin}: not a zip file; pass a medigan model package (.zip from its Zenodo record)"
        ) from None
    members = archive.infolist()
    if len(members) > MAX_MEMBERS or sum(m.file_size for m in members) > MAX_UNPACKED_BYTES:
        raise GeneratorError(f"{origin}: more than {MAX_MEMBERS} files or 8 GiB unpacked; not a medigan package")
    for member in members:
        name = PurePosixPath(member.filename)
        is_link = (member.external_attr >> 16) & 0o170000 == 0o120000
        if name.is_absolute() or ".." in name.parts or "\\" in member.filename or ":" in member.filename or is_link:
            raise GeneratorError(f"{origin}: unsafe member {member.filename[:60]!r} (absolute, '..' or a link)")
    return archive


def package_root(archive: zipfile.ZipFile, package_name: str, origin: str) -> str:
    """The folder inside the zip that holds ``__init__.py``: ``""`` (medigan's published
    layout) or ``<package_name>/`` (also accepted by medigan)."""
    names = set(archive.namelist())
    for prefix in ("", f"{package_name}/"):
        if f"{prefix}__init__.py" in names:
            return prefix
    tops = sorted({n.split("/")[0] for n in names})[:6]
    raise GeneratorError(
        f"{origin}: no __init__.py at the top of the zip or in {package_name}/ (found {tops}); "
        "a medigan package is its folder zipped from the inside"
    )


def extract(archive: zipfile.ZipFile, prefix: str, target: Path) -> None:
    """Extract the members under ``prefix`` into ``target`` (names already checked)."""
    for member in archive.infolist():
        if member.is_dir() or not member.filename.startswith(prefix):
            continue
        relative = member.filename[len(prefix) :]
        destination = safe_join(target, relative, what="medigan package member")
        destination.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(member) as source, destination.open("wb") as sink:
            shutil.copyfileobj(source, sink)


def module_name(package_name: str) -> str:
    """A folder/module name for the package (medigan's ids start with digits: fine for importlib)."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", package_name)
    return name or "medigan_package"


# ---------------------------------------------------------------------------------------- images


def to_unit_chw(array: np.ndarray, output_range: Sequence[float] | None, what: str) -> np.ndarray:
    """One image as float32 ``(C, H, W)`` in [0, 1]: ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)``
    (C in 1, 3, 4; ``(H, W, C)`` when both read; a leading batch axis of 1 is dropped); integers divided by their dtype's
    maximum, floats mapped from ``output_range`` (default: must lie in [0, 1])."""
    image = np.asarray(array)
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim == 2:
        image = image[None]
    elif image.ndim == 3 and image.shape[-1] in (1, 3, 4):  # (H, W, C) first: cv2/PIL images, medigan's usual
        image = np.moveaxis(image, -1, 0)
    elif not (image.ndim == 3 and image.shape[0] in (1, 3, 4)):
        raise GeneratorError(f"{what}: got an image of shape {image.shape}; expected (H, W), (H, W, C) or (C, H, W)")
    if image.dtype == np.bool_:
        unit = image.astype(np.float32)
    elif np.issubdtype(image.dtype, np.integer):
        unit = image.astype(np.float32) / float(np.iinfo(image.dtype).max)
    else:
        unit = image.astype(np.float32)
        if output_range is not None:
            low, high = (float(v) for v in output_range)
            unit = (unit - low) / (high - low)
        elif float(unit.min()) < -1e-6 or float(unit.max()) > 1 + 1e-6:
            raise GeneratorError(
                f"{what}: float images in [{unit.min():.4g}, {unit.max():.4g}], not [0, 1]; set the card's "
                "network.output_range to the package's raw range (e.g. [-1, 1] or [0, 255]); "
                "import-medigan-model --output-range LOW HIGH"
            )
    return np.clip(unit, 0.0, 1.0).astype(np.float32)


def _read_image(folder: Path, what: str) -> np.ndarray:
    """The image a call left in ``folder``: ``image.npy`` from a returned array, else the
    first image file the package wrote (names containing 'mask' last)."""
    if (folder / "image.npy").is_file():
        return np.load(folder / "image.npy", allow_pickle=False)
    files = sorted(
        (p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda p: ("mask" in p.name.lower(), str(p)),
    )
    if not files:
        raise GeneratorError(
            f"{what}: the package's generate returned nothing and wrote no image file "
            f"({', '.join(IMAGE_SUFFIXES)}); check its generate_method in global.json"
        )
    if files[0].suffix.lower() == ".npy":
        return np.load(files[0], allow_pickle=False)
    from PIL import Image

    with Image.open(files[0]) as picture:
        return np.asarray(picture)


# ---------------------------------------------------------------------------------------- the generator


class MediganGenerator:
    """A medigan package as a ``generators.contract.Generator`` (unconditional): images
    float32 ``(N, C, H, W)`` in [0, 1], image ``i`` a function of ``(seed, i)``. The package
    runs in a child process per ``generate`` call; nothing of it is imported here."""

    def __init__(self, card: ModelCard, zip_path: Path, device: str = "cpu") -> None:
        self.card = card
        self.device = device
        network = dict(card.network)
        package_name = str(network.get("package_name") or "")
        if not package_name:
            raise GeneratorError(f"{card.ref}: network.package_name is missing; re-import with import-medigan-model")
        self._tmp = tempfile.mkdtemp(prefix="synthmed-medigan-")
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._tmp, True)
        archive = read_package(read_verified(zip_path, card.weights.sha256), str(zip_path))
        prefix = package_root(archive, package_name, str(zip_path))
        self.module = module_name(package_name)
        self.package_dir = Path(self._tmp) / "packages" / self.module
        extract(archive, prefix, self.package_dir)
        weights_name = f"{network.get('model_name', '')}{network.get('extension', '')}"
        self.model_file = self.package_dir / weights_name
        if not weights_name or not self.model_file.is_file():
            raise GeneratorError(
                f"{card.ref}: the package has no weights file {weights_name!r} (execution.model_name + extension); "
                "fix model_name/extension in the card's network"
            )
        self.function = str(network.get("generate_method") or "generate")
        self.custom = dict(network.get("generate_args") or {})
        self.save_images = bool(network.get("save_images", False))
        self.output_range = network.get("output_range")
        self.python = str(network.get("python") or sys.executable)
        self.timeout_s = float(network.get("timeout_s", 600))

    def raw(self, n: int, seed: int) -> list[np.ndarray]:
        """The package's own images for stream indices of ``n`` images (as it returned them)."""
        with tempfile.TemporaryDirectory(prefix="run-", dir=self._tmp) as run:
            run = Path(run)
            spec = {
                "parent": str(self.package_dir.parent),
                "module": self.module,
                "function": self.function,
                "model_file": str(self.model_file),
                "custom": self.custom,
                "save_images": self.save_images,
                "seed": int(seed),
                "indices": list(indices(n)),
                "out": str(run / "out"),
            }
            (run / "out").mkdir()
            (run / "spec.json").write_text(json.dumps(spec))
            env = dict(os.environ)
            if self.device == "cpu":
                env["CUDA_VISIBLE_DEVICES"] = ""
            command = [self.python, "-I", "-c", RUNNER, str(run / "spec.json")]
            try:
                done = subprocess.run(
                    command, cwd=run, env=env, capture_output=True, text=True, timeout=self.timeout_s, check=False
                )
            except subprocess.TimeoutExpired:
                raise GeneratorError(
                    f"{self.card.ref}: the medigan package did not finish {n} image(s) in {self.timeout_s:g} s; "
                    "raise network.timeout_s or generate fewer images per call"
                ) from None
            except OSError as exc:
                raise GeneratorError(
                    f"{self.card.ref}: cannot start {self.python} ({exc}); fix network.python"
                ) from None
            if done.returncode != 0:
                lines = [line for line in done.stderr.splitlines() if line.strip()]
                raise GeneratorError(
                    f"{self.card.ref}: the medigan package's {self.function}() failed (exit {done.returncode}): "
                    f"{_one_line(lines[-1] if lines else 'no message')}; check its dependencies "
                    f"({', '.join(self.card.dependencies) or 'none listed'}) are installed for {self.python}"
                )
            return [_read_image(run / "out" / f"{k:07d}", self.card.ref) for k in range(n)]

    def generate(self, n: int, seed: int, condition: Sequence[str] | str | None = None) -> GeneratedBatch:
        """``n`` images float32 ``(n, C, H, W)`` in [0, 1]; deterministic for ``seed``."""
        if n < 1:
            raise GeneratorError(f"expected n >= 1, got {n}")
        if condition is not None:
            raise GeneratorError(
                f"{self.card.ref}: medigan packages run unconditionally here; generate with no condition "
                "(pass a package's own condition argument through network.generate_args)"
            )
        images = np.stack([to_unit_chw(a, self.output_range, self.card.ref) for a in self.raw(n, seed)])
        return GeneratedBatch(images=images, masks=None, labels=[None] * n)


def load_medigan_generator(
    card: ModelCard, weights: Path | None, device: str = "cpu", *, allow_code: bool = False
) -> MediganGenerator:
    """A ``medigan`` card's generator; refused unless ``allow_code`` (the package runs its own code)."""
    if not allow_code:
        raise GeneratorError(
            f"{card.ref}: a medigan package runs its own Python code (in a subprocess); pass allow_code=True "
            "(CLI --allow-code) only for a package from a source you trust"
        )
    if weights is None:
        raise GeneratorError(f"{card.ref}: the card names no package zip (weights.file); re-import it")
    return MediganGenerator(card, weights, device)


# ---------------------------------------------------------------------------------------- import


def find_entry(
    archive: zipfile.ZipFile, model_id: str | None, global_json: Path | None, origin: str
) -> tuple[str, dict[str, Any]]:
    """``(model id, global.json entry)``: from ``global_json`` when given, else a
    ``metadata.json`` or ``global.json`` inside the zip (medigan's contributor metadata),
    else synthmed's copy of medigan's index (``generators/zoo/medigan/global.json``).
    ``model_id`` defaults to the zip's name, or the only entry of the file."""
    sources: list[tuple[str, Any]] = []
    if global_json is not None:
        if not global_json.is_file():
            raise ConfigError(f"{global_json}: not found; pass the global.json (or metadata.json) holding the entry")
        sources.append((str(global_json), global_json.read_text()))
    else:
        for name in archive.namelist():
            if PurePosixPath(name).name in ("metadata.json", "global.json") and name.count("/") <= 1:
                sources.append((f"{origin}:{name}", archive.read(name).decode("utf-8", "replace")))
        shipped = Path(__file__).resolve().parent / "zoo" / "medigan" / "global.json"
        if shipped.is_file():
            sources.append((str(shipped), shipped.read_text()))
    wanted = model_id or Path(origin).stem
    for where, text in sources:
        try:
            index = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not valid JSON ({exc}); pass medigan's global.json") from None
        if not isinstance(index, dict):
            continue
        if wanted in index and isinstance(index[wanted], dict):
            return wanted, index[wanted]
        if model_id is None and len(index) == 1 and isinstance(next(iter(index.values())), dict):
            return next(iter(index.items()))
    looked = ", ".join(w for w, _ in sources) or "nowhere"
    raise ConfigError(
        f"{origin}: no global.json entry for model '{wanted}' (looked in {looked}); pass --global-json with the "
        "model's entry and --model-id"
    )


def import_medigan_model(
    zip_path: Path | str,
    out: Path | str,
    *,
    allow_code: bool = False,
    model_id: str | None = None,
    global_json: Path | str | None = None,
    card_id: str | None = None,
    version: str | None = None,
    output_range: Sequence[float] | None = None,
    python: str | None = None,
) -> Path:
    """Write ``OUT/card.yaml`` and a copy of the package zip for a downloaded medigan model;
    returns the card path (register it with ``generators.conformance.register``). The card
    keeps the global.json entry's fields (``generators.medigan.card_from_entry``) with
    architecture ``medigan``; image size and channels come from one image the package makes
    here (in a subprocess, so ``allow_code`` is required)."""
    from generators.medigan import card_from_entry

    zip_path, out = Path(zip_path), Path(out)
    if not allow_code:
        raise GeneratorError(
            f"{zip_path}: importing a medigan package runs its generate function (its own code, in a subprocess); "
            "pass --allow-code only for a package from a source you trust"
        )
    if not zip_path.is_file():
        raise ConfigError(f"{zip_path}: not found; pass the path of the medigan model package (.zip)")
    archive = read_package(zip_path.read_bytes(), str(zip_path))
    found_id, entry = find_entry(archive, model_id, Path(global_json) if global_json else None, str(zip_path))
    listed = card_from_entry(found_id, entry)
    execution = entry.get("execution", {})
    method = execution.get("generate_method") or {}
    package_name = str(execution.get("package_name") or found_id)
    package_root(archive, package_name, str(zip_path))  # fails early on a wrong layout
    data = listed.model_dump(mode="json")
    data.update(
        architecture="medigan",
        network={
            "package_name": package_name,
            "model_name": execution.get("model_name", ""),
            "extension": execution.get("extension", ""),
            "generate_method": method.get("name") or "generate",
            "generate_args": (method.get("args") or {}).get("custom") or {},
            "save_images": False,
            "output_range": list(output_range) if output_range is not None else None,
            "python": python,
            "timeout_s": 600,
            "medigan_type": listed.network.get("medigan_type"),
        },
        weights={"file": zip_path.name, "sha256": sha256_file(zip_path), "format": "zip"},
        tags=[t for t in data["tags"] if t != "weights-unavailable"],
    )
    data["id"] = card_id or data["id"]
    data["version"] = version or f"{data['version']}{PACKAGE_VERSION_SUFFIX}"
    data["origin"] = {**data["origin"], "kind": "medigan"}
    try:
        card = ModelCard.model_validate(data)
    except ValidationError as exc:
        raise card_error(exc, f"medigan package {zip_path.name}") from None
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(zip_path, out / zip_path.name)
    probe = MediganGenerator(card, out / zip_path.name).raw(1, 0)[0]
    chw = to_unit_chw(probe, output_range, card.ref)
    data.update(image_size=[int(chw.shape[1]), int(chw.shape[2])], channels=int(chw.shape[0]))
    if list(listed.image_size) != data["image_size"]:
        data["description"] = (
            f"{data['description']} (global.json says {list(listed.image_size)}; the package makes "
            f"{data['image_size']})"
        ).strip()
    card = ModelCard.model_validate(data)
    save_card(card, out / "card.yaml")
    return out / "card.yaml"
