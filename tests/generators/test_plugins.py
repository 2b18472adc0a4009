"""Contributed architectures from installed packages (entry-point group ``synthmed.architectures``).

A real package is written into a temporary folder, built and installed by pip into a
``--target`` folder (never into the project's venv), which is then put on ``sys.path``
(in a subprocess for the full CLI flow, with ``monkeypatch.syspath_prepend`` in process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from generators import plugins, registry
from generators.card import load_card
from generators.errors import ConfigError, GeneratorError
from generators.registry import Entry, load_generator
from generators.weights import save_weights

ROOT = Path(__file__).resolve().parents[2]
LATENT, SIZE, LABELS = 8, 16, ["healthy", "lesion"]

PACKAGE = '''
"""A contributed synthmed architecture: latent + label embedding -> sigmoid(linear) image."""
import torch
from torch import nn


class TinyMlp(nn.Module):
    def __init__(self, latent_dim: int, image_size: int, channels: int, n_labels: int) -> None:
        super().__init__()
        self.shape = (channels, image_size, image_size)
        self.embed = nn.Embedding(n_labels, latent_dim)
        self.linear = nn.Linear(latent_dim, channels * image_size * image_size)

    def forward(self, z, label_index):
        return torch.sigmoid(self.linear(z + self.embed(label_index))).reshape(-1, *self.shape)


class Architecture:
    """build(network) -> nn.Module; generate(module, latent, label_index) -> (N, C, H, W) in [0, 1]."""

    def build(self, network):
        return TinyMlp(network["latent_dim"], network["image_size"], network["channels"], network["n_labels"])

    def generate(self, module, latent, label_index):
        return module(latent, label_index)


ARCHITECTURE = Architecture()
'''


def _install(root: Path, name: str, module: str, entry: str, source: str) -> Path:
    """Write a package with one ``synthmed.architectures`` entry point and pip-install it
    into ``root/site`` (no network, no build isolation, nothing in the project's venv)."""
    package = root / "src"
    (package / module).mkdir(parents=True)
    (package / module / "__init__.py").write_text(source)
    (package / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""
            [build-system]
            requires = ["setuptools"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "{name}"
            version = "0.1.0"

            [tool.setuptools]
            packages = ["{module}"]

            [project.entry-points."synthmed.architectures"]
            {entry} = "{module}:ARCHITECTURE"
            """
        )
    )
    site = root / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet"]
        + ["--target", str(site), str(package)],
        capture_output=True,
        text=True,
        check=False,
        cwd=root,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert list(site.glob(f"{name.replace('-', '_')}-0.1.0.dist-info/entry_points.txt"))
    return site


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    return _install(tmp_path_factory.mktemp("tinymlp"), "synthmed-tinymlp", "synthmed_tinymlp", "tinymlp", PACKAGE)


@pytest.fixture(scope="module")
def clash_site(tmp_path_factory) -> Path:
    return _install(tmp_path_factory.mktemp("clash"), "synthmed-clash", "synthmed_clash", "dcgan", PACKAGE)


def _model(directory: Path, *, latent_dim: int = LATENT) -> tuple[Path, Path]:
    """card.yaml + weights.safetensors of a tinymlp model (the card written as plain YAML:
    validating it needs the package installed)."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    state = {
        "embed.weight": torch.randn(len(LABELS), latent_dim),
        "linear.weight": torch.randn(SIZE * SIZE, latent_dim) * 0.5,
        "linear.bias": torch.zeros(SIZE * SIZE),
    }
    sha = save_weights(state, directory / "weights.safetensors")
    card = {
        "id": "contrib/tinymlp",
        "version": "1.0.0",
        "architecture": "tinymlp",
        "network": {"latent_dim": LATENT, "image_size": SIZE, "channels": 1, "n_labels": len(LABELS)},
        "modality": "MRI",
        "anatomy": "brain",
        "image_size": [SIZE, SIZE],
        "channels": 1,
        "latent_dim": LATENT,
        "conditioning": {"labels": LABELS},
        "licence": "MIT",
        "weights": {"file": "weights.safetensors", "sha256": sha},
        "origin": {"kind": "contributed"},
    }
    (directory / "card.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    return directory / "card.yaml", directory / "weights.safetensors"


def test_installed_package_is_found_checked_registered_and_generates(site, tmp_path):
    """The acceptance flow, in a fresh interpreter with only the --target folder added:
    found by discovery, `generators check` passes, `generators add` registers, images come back."""
    card, weights = _model(tmp_path / "model")
    user_registry = tmp_path / "registry"
    script = textwrap.dedent(
        f"""
        import json, sys
        import numpy as np
        from flows.cli import main
        from generators import plugins
        from generators.api import get_dataloader, get_generator
        out = {{"names": list(plugins.plugin_names()),
                "imported_by_discovery": "synthmed_tinymlp" in sys.modules}}
        out["check"] = main(["generators", "check", {str(card)!r}, {str(weights)!r}])
        out["add"] = main(["generators", "add", {str(card)!r}, {str(weights)!r}])
        batch = get_generator("contrib/tinymlp@1.0.0").generate(6, 0)
        images = np.asarray(batch.images)
        out.update(shape=list(images.shape), dtype=str(images.dtype), low=float(images.min()),
                   high=float(images.max()), labels=batch.labels,
                   loader=list(next(iter(get_dataloader("contrib/tinymlp", length=4, batch_size=4)))[0].shape))
        print("RESULT " + json.dumps(out))
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "SYNTHMED_REGISTRY": str(user_registry)}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT, check=False, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert result["names"] == ["tinymlp"] and result["imported_by_discovery"] is False
    assert result["check"] == 0, done.stdout
    assert "conformance of contrib/tinymlp@1.0.0: passed" in done.stdout
    assert result["add"] == 0 and (user_registry / "contrib" / "tinymlp" / "1.0.0" / "card.yaml").is_file()
    assert result["shape"] == [6, 1, SIZE, SIZE] and result["dtype"] == "float32"
    assert 0.0 <= result["low"] < result["high"] <= 1.0
    assert result["labels"] == LABELS * 3
    assert result["loader"] == [4, 1, SIZE, SIZE]


def test_without_the_package_the_architecture_is_unknown(tmp_path):
    card, _ = _model(tmp_path / "model")
    with pytest.raises(ConfigError, match="unknown architecture 'tinymlp'"):
        load_card(card)


def test_in_process_generation_is_seeded_and_a_weights_mismatch_names_keys_and_shapes(site, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(site))
    assert "tinymlp" in plugins.plugin_names()
    card_path, _ = _model(tmp_path / "model")
    entry = Entry(load_card(card_path), card_path)
    generator = load_generator(entry)
    first, again = generator.generate(4, 3), generator.generate(4, 3)
    assert first.images.shape == (4, 1, SIZE, SIZE) and first.images.dtype == np.float32
    assert np.array_equal(first.images, again.images)
    assert not np.allclose(first.images, generator.generate(4, 4).images)
    assert generator.generate(2, 0, "lesion").labels == ["lesion", "lesion"]

    bad_path, _ = _model(tmp_path / "bad", latent_dim=LATENT + 4)  # card says 8, weights were made for 12
    with pytest.raises(GeneratorError) as caught:
        load_generator(Entry(load_card(bad_path), bad_path))
    message = str(caught.value)
    assert "\n" not in message and "Error(s) in loading state_dict" not in message
    assert "embed.weight [2, 12] in the file, [2, 8] in the network" in message
    assert "linear.weight [256, 12] in the file, [256, 8] in the network" in message


def test_a_package_claiming_a_builtin_name_is_refused_in_one_line(clash_site, monkeypatch):
    monkeypatch.syspath_prepend(str(clash_site))
    with pytest.raises(GeneratorError) as caught:
        registry._architecture_loaders()
    message = str(caught.value)
    assert "\n" not in message
    assert "architecture 'dcgan' of the installed package synthmed-clash 0.1.0" in message
    assert "clashes with synthmed's built-in 'dcgan'" in message
    assert "dcgan" not in plugins.plugin_names()  # card validation never sees the clashing name
