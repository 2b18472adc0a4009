"""``synthmed new-pipeline`` / ``synthmed init`` on data the project was not developed on:
pydicom's CT and MR test files, nibabel's anatomical NIfTI and PNG slices of the MNI152
brain with grey-matter masks, arranged into class folders. The scaffolded entry must pass
the validator, the rest of pipelines.yaml must stay byte for byte, and dvc.yaml must get
the new pipeline's stages."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom.data
import pytest
import yaml
from PIL import Image

from flows.cli import main
from flows.scaffold import inspect_source, min_images_per_class, new_pipeline, summary_lines, warnings_for
from generators.errors import ConfigError
from tasks.config import load_pipeline, load_pipelines
from tasks.ingest import mni152_files
from tests.flows.project import TINY, run

DICOM_DIR = Path(pydicom.data.__file__).parent / "test_files"
NIFTI_DIR = Path(nib.__file__).parent / "tests" / "data"


def _brain_slices(folder: Path, count: int, start: int, masks: bool = False) -> None:
    """PNG axial slices of the real MNI152 T1 (uint8), optionally with ``<stem>_mask.png``
    (grey matter > 0.5 as class 1)."""
    files = mni152_files()
    t1 = np.asarray(nib.load(str(files["t1"])).dataobj, dtype=np.float32)
    gm = np.asarray(nib.load(str(files["gm"])).dataobj, dtype=np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        k = start + 6 * i
        plane = np.rot90(t1[:, :, k])
        image = np.clip(plane / max(float(t1.max()), 1.0) * 255, 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"slice{k:03d}.png")
        if masks:
            mask = (np.rot90(gm[:, :, k]) > 0.5).astype(np.uint8)
            Image.fromarray(mask).save(folder / f"slice{k:03d}_mask.png")


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """``ct/`` 8 DICOM (pydicom CT_small, 128x128), ``mr/`` 3 DICOM (MR_small 64x64: too few),
    ``brain/`` 8 PNG slices (233x197: a third size), one TIFF, a notes file, a hidden file."""
    root = tmp_path / "scans"
    for label, name, n in (("ct", "CT_small.dcm", 8), ("mr", "MR_small.dcm", 3)):
        (root / label).mkdir(parents=True)
        for i in range(n):
            shutil.copy(DICOM_DIR / name, root / label / f"{label}{i}.dcm")
    _brain_slices(root / "brain", 8, 60)
    Image.new("L", (40, 40)).save(root / "brain" / "extra.tif")
    (root / "ct" / "notes.txt").write_text("acquisition notes\n")
    (root / "ct" / ".DS_Store").write_bytes(b"\0")
    return root


def test_inspect_counts_classes_formats_sizes_and_warns(dataset: Path) -> None:
    findings = inspect_source(dataset)
    assert {label: c.files for label, c in findings.classes.items()} == {"brain": 8, "ct": 8, "mr": 3}
    assert findings.formats == {"DICOM": 11, "PNG": 8}
    assert findings.sizes == {(128, 128): 8, (64, 64): 3, (233, 197): 8}
    assert findings.unreadable == {"TIFF": 1} and findings.other == {".txt": 1} and findings.hidden == 1
    notes = "\n".join(warnings_for(findings, "classification"))
    need = min_images_per_class()
    # ingest groups DICOM by PatientID: the 8 copies of CT_small are one subject, so all of them
    # would land in one split; the 8 PNG slices are 8 subjects (one per file)
    assert "class 'ct': 8 image file(s) from 1 subject(s); splits are made by subject" in notes
    assert "class 'mr': 3 image file(s) from 1 subject(s)" in notes and f"about {need} subjects" in notes
    assert "class 'brain'" not in notes
    assert {label: len(c.subjects) for label, c in findings.classes.items()} == {"brain": 8, "ct": 1, "mr": 1}
    assert "3 different image sizes" in notes
    assert "1 TIFF file(s)" in notes and "1 non-image file(s) (.txt x1)" in notes
    assert "hidden" in notes
    assert "mr0" not in notes and "slice" not in notes  # counts and suffixes, never file names


def test_nifti_volume_is_counted_with_its_slices(tmp_path: Path) -> None:
    root = tmp_path / "vols"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        shutil.copy(NIFTI_DIR / "anatomical.nii", root / label / "anat.nii")
    findings = inspect_source(root)
    shape = nib.load(str(NIFTI_DIR / "anatomical.nii")).shape
    assert findings.classes["a"].volumes == 1 and findings.classes["a"].slices == shape[2]
    assert findings.formats == {"NIfTI": 2}


def test_a_4d_series_is_flagged_as_ingest_refuses_it(tmp_path: Path) -> None:
    """A 4D NIfTI (fMRI-like, 3 volumes) is not counted as a usable volume: ingest refuses it."""
    root = tmp_path / "series"
    (root / "a").mkdir(parents=True)
    data = np.asarray(nib.load(str(NIFTI_DIR / "anatomical.nii")).dataobj)[..., None].repeat(3, axis=3)
    nib.save(nib.Nifti1Image(data, np.eye(4)), root / "a" / "bold.nii.gz")
    shutil.copy(NIFTI_DIR / "anatomical.nii", root / "a" / "anat.nii")
    findings = inspect_source(root)
    assert findings.classes["a"].files == 1 and findings.classes["a"].volumes == 1
    notes = [n for n in warnings_for(findings, "classification") if "4D" in n]
    assert notes == [
        "1 file(s): NIfTI series with more than one volume (4D): split it into 3D volumes first; ingest rejects them"
    ]


def test_new_pipeline_appends_a_valid_entry_keeping_the_file(dataset: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    config = project / "pipelines.yaml"
    original = "# my pipelines, hand-written\npipelines:\n  # the tiny one\n  tiny:\n" + "".join(
        f"    {line}\n" for line in yaml.safe_dump(TINY, sort_keys=False).splitlines()
    )
    config.write_text(original)
    scaffold = new_pipeline(config, dataset, "classification", "scans")
    text = config.read_text()
    assert text.startswith(original)  # comments and layout of the rest: byte for byte
    assert set(load_pipelines(config).pipelines) == {"tiny", "scans"}
    cfg = load_pipeline("scans", config)
    assert cfg.source.kind == "folder" and cfg.source.path == str(dataset.resolve())  # outside: absolute
    assert cfg.preprocess.size == 64 and cfg.retrain.task == "classification"  # capped for CPU
    train = cfg.generator.train  # 19 files, ~11 train images: one batch of 32 per epoch
    assert train.architecture == "ldm" and train.epochs == 1200 and train.autoencoder_epochs == 750
    assert "generator: latent diffusion (ldm)" in "\n".join(summary_lines(scaffold))
    assert "pipelines.yaml" in scaffold.written
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    assert {f"{verb}-scans" for verb in ("ingest", "train", "synthesize", "filter", "retrain", "report")} <= set(stages)
    assert "ingest-tiny" in stages
    with pytest.raises(ConfigError, match="a pipeline named 'scans' exists"):
        new_pipeline(config, dataset, "classification", "scans")
    assert config.read_text() == text


def test_segmentation_pairs_become_a_csv_source(tmp_path: Path) -> None:
    root = tmp_path / "seg"
    _brain_slices(root / "upper", 8, 100, masks=True)
    _brain_slices(root / "lower", 8, 40, masks=True)
    config = tmp_path / "pipelines.yaml"
    config.write_text("pipelines:\n")
    scaffold = new_pipeline(config, root, "segmentation", render_dvc=False)
    assert scaffold.findings.classes["upper"].masks == 8 and scaffold.findings.files == 16
    assert not [w for w in scaffold.warnings if "no mask" in w]
    cfg = load_pipeline("seg", config)
    assert cfg.source.kind == "csv" and cfg.retrain.network == "unet" and cfg.generator.train.with_masks
    rows = (tmp_path / "seg-manifest.csv").read_text().splitlines()
    assert rows[0] == "image,label,subject,mask" and len(rows) == 17
    assert rows[1].startswith("lower/slice040.png,lower,slice040,lower/slice040_mask.png")


@pytest.mark.integration
def test_cli_init_then_ingest_reads_what_was_scaffolded(dataset: Path, tmp_path: Path) -> None:
    out = run(["synthmed", "init", str(tmp_path / "proj"), "--from-folder", str(dataset), "--name", "scans"], tmp_path)
    assert "found: folder source, 3 classes, 19 image files" in out
    assert "warning: class 'mr': 3 image file(s) from 1 subject(s)" in out
    assert "next: cd" in out
    proj = tmp_path / "proj"
    assert (proj / ".git").is_dir() and (proj / ".dvc").is_dir() and (proj / "dvc.yaml").is_file()
    assert "up to date" in run(["synthmed", "dvc-yaml", "--check", "--no-code"], proj)  # outside the repo: no code deps
    ingest = run(["synthmed", "stage", "ingest", "--pipeline", "scans"], proj)
    # every readable file ingested; the TIFF, the notes and the hidden file rejected
    assert "ingest: 19 rows from 19 inputs (3 rejected" in ingest


def test_cli_dry_run_writes_nothing(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "pipelines.yaml"
    config.write_text("pipelines:\n")
    code = main(["new-pipeline", "--from-folder", str(dataset), "--config", str(config), "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0 and "would append" in out and "  scans:\n    description:" in out
    assert config.read_text() == "pipelines:\n" and not (tmp_path / "dvc.yaml").exists()
