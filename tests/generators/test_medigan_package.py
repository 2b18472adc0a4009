"""medigan model packages run in a subprocess: ``synthmed generators import-medigan-model``.

Each test builds a real package in medigan 1.0.0's published layout (the package folder
zipped from its root, as medigan's ``ZenodoModelUploader`` does with
``shutil.make_archive(root_dir=package)``): ``__init__.py`` with ``generate(model_file,
num_samples, output_path, save_images, **custom)``, a helper module imported relatively,
and numpy weights ``Generator.npy``."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from flows.cli import main as cli_main
from generators.api import get_dataloader, get_generator
from generators.errors import GeneratorError
from generators.medigan_package import import_medigan_model, to_unit_chw

MODEL_ID = "00099_TINY_NUMPY_MRI"
SIZE, LATENT = 16, 8

INIT = '''
"""Tiny medigan-style model: z ~ N(0, I), image = sigmoid(z @ W) as uint8."""
import os
from pathlib import Path

import numpy as np

from .sampler import to_uint8


def generate(model_file, num_samples, output_path, save_images=True, image_size=16, pid_file=None, mode="return"):
    if pid_file:
        with open(pid_file, "a") as handle:
            handle.write(f"{os.getpid()}\\n")
    if mode == "fail":
        raise ValueError("the checkpoint is corrupt (test package)")
    weights = np.load(model_file)
    images = []
    for i in range(num_samples):
        z = np.random.standard_normal(weights.shape[0])
        image = to_uint8(z @ weights).reshape(image_size, image_size, 1)
        if save_images or mode == "files":
            from PIL import Image

            Image.fromarray(image[..., 0]).save(Path(output_path) / f"sample_{i}.png")
            Image.fromarray(np.zeros_like(image[..., 0])).save(Path(output_path) / f"sample_{i}_mask.png")
        else:
            images.append(image)
    return None if (save_images or mode == "files") else images
'''
SAMPLER = """
import numpy as np


def to_uint8(x):
    return (255.0 / (1.0 + np.exp(-x))).astype(np.uint8)
"""


def _entry(custom: dict) -> dict:
    """A medigan global.json entry (execution, selection, description) for the test model."""
    return {
        "execution": {
            "package_name": MODEL_ID,
            "package_link": f"https://zenodo.org/record/0/files/{MODEL_ID}.zip?download=1",
            "model_name": "Generator",
            "extension": ".npy",
            "image_size": [SIZE, SIZE],
            "dependencies": ["numpy", "Pillow"],
            "generate_method": {
                "name": "generate",
                "args": {"base": ["model_file", "num_samples", "output_path", "save_images"], "custom": custom},
                "input_latent_vector_size": LATENT,
            },
        },
        "selection": {
            "performance": {"FID": 42.0},
            "use_cases": ["classification"],
            "organ": ["brain"],
            "modality": ["MRI"],
            "type": "DCGAN",
            "license": "MIT",
            "dataset": ["test data"],
            "tags": ["Brain", "MRI"],
            "year": "2024",
        },
        "description": {"title": "Tiny numpy test model", "version": "1.0.0", "comment": "built by the test"},
    }


def make_package(tmp_path: Path, custom: dict, *, nested: bool = False, metadata_inside: bool = False) -> Path:
    """``tmp_path/<MODEL_ID>.zip`` in medigan's layout (files at the zip's top, or in
    ``<package_name>/`` when ``nested``); with ``metadata_inside`` the entry travels in the
    zip as ``metadata.json`` (medigan's contributor metadata), else as ``tmp_path/global.json``."""
    package = tmp_path / "build" / MODEL_ID
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(INIT)
    (package / "sampler.py").write_text(SAMPLER)
    rng = np.random.default_rng(0)
    np.save(package / "Generator.npy", rng.standard_normal((LATENT, SIZE * SIZE)).astype(np.float32))
    index = {MODEL_ID: _entry(custom)}
    if metadata_inside:
        (package / "metadata.json").write_text(json.dumps(index))
    else:
        (tmp_path / "global.json").write_text(json.dumps(index))
    root = package.parent if nested else package
    return Path(shutil.make_archive(str(tmp_path / MODEL_ID), "zip", root_dir=root))


@pytest.fixture(autouse=True)
def user_registry(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "user-registry"
    monkeypatch.setenv("SYNTHMED_REGISTRY", str(path))
    return path


def test_package_is_imported_checked_registered_and_generates_in_a_subprocess(tmp_path, user_registry, capsys):
    pid_file = tmp_path / "pids.txt"
    package = make_package(tmp_path, {"image_size": SIZE, "pid_file": str(pid_file)})
    rc = cli_main(
        ["generators", "import-medigan-model", str(package), "--global-json", str(tmp_path / "global.json")]
        + ["--allow-code"]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"conformance of medigan/{MODEL_ID}@1.0.0+package: passed" in out
    assert (user_registry / "medigan" / MODEL_ID / "1.0.0+package" / f"{MODEL_ID}.zip").is_file()

    generator = get_generator(f"medigan/{MODEL_ID}", allow_code=True)
    assert generator.card.architecture == "medigan" and generator.card.metrics["fid"].value == 42.0
    batch = generator.generate(5, 0)
    images = batch.images
    assert images.shape == (5, 1, SIZE, SIZE) and images.dtype == np.float32
    assert 0.0 <= images.min() < images.max() <= 1.0
    assert np.allclose(images * 255, np.round(images * 255), atol=1e-4)  # uint8 images read back exactly
    assert np.array_equal(images, generator.generate(5, 0).images)  # seeded per image
    assert not np.allclose(images[0], images[1])
    pids = {int(p) for p in pid_file.read_text().split()}
    assert pids and os.getpid() not in pids  # the package's code ran in child processes only
    assert MODEL_ID not in sys.modules and "sampler" not in sys.modules

    loader = get_dataloader(f"medigan/{MODEL_ID}", length=3, batch_size=3, allow_code=True)
    first = next(iter(loader))[0]
    assert tuple(first.shape) == (3, 1, SIZE, SIZE)
    assert np.allclose(first.numpy(), images[:3])  # the dataloader's sample i is image i of seed 0
    with pytest.raises(GeneratorError, match="allow_code=True"):
        get_dataloader(f"medigan/{MODEL_ID}", length=3)


def test_without_allow_code_the_package_is_refused_in_one_line_and_never_run(tmp_path, user_registry, capsys):
    pid_file = tmp_path / "pids.txt"
    package = make_package(tmp_path, {"image_size": SIZE, "pid_file": str(pid_file)})
    rc = cli_main(["generators", "import-medigan-model", str(package), "--global-json", str(tmp_path / "global.json")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1
    assert err.startswith("error:") and "--allow-code" in err
    assert not pid_file.exists() and not user_registry.exists()


def test_nested_layout_with_metadata_inside_and_images_written_as_files(tmp_path, user_registry):
    package = make_package(tmp_path, {"image_size": SIZE, "mode": "files"}, nested=True, metadata_inside=True)
    card_path = import_medigan_model(package, tmp_path / "card", allow_code=True)
    assert card_path.is_file()
    rc = cli_main(["generators", "add", str(card_path), "--allow-code"])
    assert rc == 0
    batch = get_generator(f"medigan/{MODEL_ID}", allow_code=True).generate(3, 7)
    assert batch.images.shape == (3, 1, SIZE, SIZE)
    assert batch.images.max() > 0  # the sample PNG, not the all-zero mask PNG next to it
    assert batch.labels == [None, None, None]


def test_a_failing_generate_function_is_one_line_naming_its_error(tmp_path):
    package = make_package(tmp_path, {"image_size": SIZE, "mode": "fail"})
    with pytest.raises(GeneratorError) as caught:
        import_medigan_model(package, tmp_path / "card", allow_code=True, global_json=tmp_path / "global.json")
    message = str(caught.value)
    assert "\n" not in message and "the checkpoint is corrupt (test package)" in message
    assert "generate() failed" in message


def test_unsafe_zip_members_are_refused(tmp_path):
    import zipfile

    bad = tmp_path / f"{MODEL_ID}.zip"
    with zipfile.ZipFile(bad, "w") as archive:
        archive.writestr("__init__.py", "def generate(**kw): pass\n")
        archive.writestr("../escape.py", "x = 1\n")
    with pytest.raises(GeneratorError, match="unsafe member '../escape.py'"):
        import_medigan_model(bad, tmp_path / "card", allow_code=True)


def test_image_layouts_and_ranges_become_unit_chw():
    hwc = np.full((4, 6, 3), 255, dtype=np.uint8)
    assert to_unit_chw(hwc, None, "t").shape == (3, 4, 6) and to_unit_chw(hwc, None, "t").max() == 1.0
    assert to_unit_chw(np.zeros((4, 6)), None, "t").shape == (1, 4, 6)
    signed = np.array([[-1.0, 1.0]], dtype=np.float32)
    assert np.allclose(to_unit_chw(signed, (-1, 1), "t"), [[[0.0, 1.0]]])
    with pytest.raises(GeneratorError, match=r"network.output_range"):
        to_unit_chw(signed, None, "t")


TORCH_INIT = '''
"""Shaped like medigan's published DCGAN packages: torch.randn latents, a state dict under
checkpoint["generator"], images mapped from [-1, 1] to uint8 (H, W, 1)."""
import numpy as np
import torch
from torch import nn


class Generator(nn.Module):
    def __init__(self, nz=8, size=16):
        super().__init__()
        self.size = size
        self.main = nn.Sequential(nn.Linear(nz, size * size), nn.Tanh())

    def forward(self, z):
        return self.main(z).reshape(-1, 1, self.size, self.size)


def generate(model_file, num_samples, output_path, save_images: bool):
    net = Generator()
    net.load_state_dict(torch.load(model_file, map_location="cpu")["generator"])
    net.eval()
    z = torch.randn(num_samples, 8)
    with torch.no_grad():
        images = net(z).numpy()
    out = [((img.transpose(1, 2, 0) + 1.0) * 127.5).astype(np.uint8) for img in images]
    if save_images:
        raise NotImplementedError("the test calls with save_images=False")
    return out
'''


def test_a_torch_package_is_seeded_per_image_in_the_child(tmp_path, user_registry):
    import torch

    package = tmp_path / "build" / MODEL_ID
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(TORCH_INIT)
    torch.manual_seed(0)
    state = {"main.0.weight": torch.randn(SIZE * SIZE, 8), "main.0.bias": torch.zeros(SIZE * SIZE)}
    torch.save({"generator": state}, package / "Generator.pt")
    entry = _entry({})
    entry["execution"]["extension"] = ".pt"
    (tmp_path / "global.json").write_text(json.dumps({MODEL_ID: entry}))
    archive = shutil.make_archive(str(tmp_path / MODEL_ID), "zip", root_dir=package)
    card = import_medigan_model(archive, tmp_path / "card", allow_code=True, global_json=tmp_path / "global.json")
    # add runs the conformance check: deterministic, seed_varies and seed_stream pass only if the
    # child seeds torch's global generator per image
    assert cli_main(["generators", "add", str(card), "--allow-code", "-n", "2"]) == 0
    batch = get_generator(f"medigan/{MODEL_ID}", allow_code=True).generate(3, 5)
    assert batch.images.shape == (3, 1, SIZE, SIZE) and batch.images.dtype == np.float32
    assert np.allclose(batch.images * 255, np.round(batch.images * 255), atol=1e-4)
