"""pipelines.yaml: named pipelines, validated by one pydantic schema.

Errors name the bad key by its full path and list the allowed values, on one line
(several problems are joined with ``; ``), e.g.::

    pipelines.yaml: pipelines.demo.retrain.task: got 'segmentaton'; allowed: 'classification',
    'segmentation' (did you mean 'segmentation'?)

A key given twice in one mapping is an error (YAML would keep the last one silently;
DVC, which reads the same file, refuses it). NaN and infinity are refused everywhere.

The YAML is pure data (no expressions, no ``_target_``); secrets come from the
environment. DVC reads the same file as its params file.
"""

from __future__ import annotations

import difflib
import re
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from generators.errors import ConfigError
from generators.safe_yaml import load_yaml
from generators.train_spec import MASK_CONDITIONED_ARCHITECTURES, VOLUME_ARCHITECTURES, Seed, TrainSpec

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "pipelines.yaml"


class Strict(BaseModel):
    """Base: unknown keys are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# --------------------------------------------------------------------------- sources
class Described(Strict):
    """What the images are, copied into the dataset's provenance and from there onto the
    cards of generators trained on it (so the zoo can search them by modality/anatomy)."""

    modality: str = "unspecified"
    anatomy: str = "unspecified"
    licence: str = Field("unspecified", description="licence of the source images, e.g. CC-BY-4.0")


class FolderSource(Described):
    """One sub-folder per class holding PNG/JPEG/DICOM/NIfTI files; subject = file stem
    unless ``subject_regex`` extracts it from the file name."""

    kind: Literal["folder"]
    path: str
    subject_regex: str | None = None


class CsvSource(Described):
    """A CSV manifest with columns ``image`` (path), ``label``, ``subject`` and optional
    ``mask``; paths are relative to ``root`` (default: the CSV's folder)."""

    kind: Literal["csv"]
    path: str
    root: str | None = None


class Mni152Source(Described):
    """The demo source: the real MNI152 2009a T1 template with grey/white-matter
    probability maps, shipped inside nilearn's wheel (BSD-3). Axial slices are labelled by
    anatomical level (MNI z band) and carry a tissue mask (0 background, 1 GM, 2 WM)."""

    kind: Literal["mni152"]
    modality: str = "MRI"
    anatomy: str = "brain"
    licence: str = "BSD-3-Clause (MNI ICBM152 2009a template, as shipped in nilearn)"
    levels_mm: tuple[float, ...] = (-20.0, 25.0)
    level_names: tuple[str, ...] = ("inferior", "middle", "superior")

    @model_validator(mode="after")
    def _names_match_levels(self) -> "Mni152Source":
        if len(self.level_names) != len(self.levels_mm) + 1:
            raise ValueError(
                f"level_names needs len(levels_mm)+1 = {len(self.levels_mm) + 1} names, got {len(self.level_names)}"
            )
        return self


def _check_s3_uri(value: str) -> str:
    bucket = value[len("s3://") :].partition("/")[0] if value.startswith("s3://") else ""
    if not bucket:
        raise ValueError("expected an s3://bucket/prefix URI, e.g. s3://my-bucket/images")
    if "@" in bucket:
        raise ValueError(
            "an s3:// URI must not contain credentials; put keys in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
        )
    return value.rstrip("/")


class S3Source(Described):
    """A folder source in an S3 bucket: ``<uri>/<class>/<file>``. Downloaded to
    ``.synthmed/<pipeline>/staging/`` at ingest, then ingested exactly like a ``folder``
    source (same rows as from a local copy). Endpoint and credentials come from the
    environment (``SYNTHMED_S3_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), see
    ``tasks/storage.py``. Changes in the bucket do not invalidate the ingest stage: rerun
    it with ``synthmed stage ingest`` (or ``dvc repro -f -s ingest-<pipeline>``)."""

    kind: Literal["s3"]
    uri: str
    subject_regex: str | None = None

    @field_validator("uri")
    @classmethod
    def _uri_is_s3(cls, value: str) -> str:
        return _check_s3_uri(value)


Source = Annotated[Union[FolderSource, CsvSource, Mni152Source, S3Source], Field(discriminator="kind")]


class SplitSpec(Strict):
    """Subject-level split fractions; ``slab_slices`` groups neighbouring slices of one
    volume into one split unit when a dataset has too few subjects to split."""

    train: float = Field(0.6, gt=0, lt=1)
    val: float = Field(0.2, ge=0, lt=1)
    test: float = Field(0.2, gt=0, lt=1)
    slab_slices: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _sums_to_one(self) -> "SplitSpec":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1.0, got {total:.3f}")
        return self


class PatchSpec(Strict):
    """Volumes cut into cubes (``preprocess.dims: 3``): one volume gives many samples.

    ``per_volume`` cubes of ``size`` voxels per side are drawn (seeded, ``pipeline.seed``)
    from each train-split region, centred where the foreground (mask, else intensity above
    the volume's mean) covers at least ``min_foreground`` of the cube. Val/test rows are
    cubes of ``eval_size`` (default ``size``), which the downstream model reads with
    sliding-window inference. With ``split_axis`` set, ONE volume is divided into three
    slabs along that axis (train/val/test in ``preprocess.split`` fractions) and each cube
    lies inside its own slab, so no voxel is shared between splits: the way to use a single
    template (the demo). Patches of one volume are NOT independent subjects; reports say so."""

    size: int = Field(32, ge=8, le=256)
    per_volume: int = Field(64, ge=1, le=100_000)
    eval_size: int | None = Field(None, ge=8, le=512)
    eval_per_volume: int = Field(4, ge=1, le=10_000, description="val/test cubes per volume (or per slab)")
    min_foreground: float = Field(0.25, ge=0, le=1)
    split_axis: Literal[0, 1, 2] | None = None


class PreprocessSpec(Strict):
    """Resampling and quantisation applied at ingest. ``dims: 2`` (default): volumes are
    sliced along ``slice_axis``; slices whose foreground fraction is below
    ``min_foreground`` dropped. ``dims: 3``: volumes (NIfTI, multi-frame or series DICOM)
    stay volumes, resampled to ``spacing_mm`` and cropped/padded to ``grid`` (D, H, W;
    default size^3) around their centre, or cut into cubes (``patch``); masks resampled by
    nearest neighbour. 2D files are rejected in a 3D pipeline.

    Axis convention of a stored volume ``(1, D, H, W)``: the closest canonical RAS voxel
    axes (``nibabel.as_closest_canonical``), D = x (left -> right), H = y (posterior ->
    anterior), W = z (inferior -> superior). An axial plane is ``volume[0, :, :, k]``, a
    coronal one ``volume[0, :, j, :]``, a sagittal one ``volume[0, i, :, :]``."""

    dims: Literal[2, 3] = 2
    spacing_mm: tuple[float, float, float] | None = Field(
        None, description="dims 3: voxel spacing after resampling, mm per axis (None: keep the file's)"
    )
    grid: tuple[int, int, int] | None = Field(None, description="dims 3: (D, H, W) after crop/pad; None: size^3")
    patch: PatchSpec | None = None
    max_volume_mib: float = Field(
        2048.0,
        gt=0,
        le=1024 * 1024,
        description="dims 3: memory one volume may take as float32 after resampling (MiB); bigger files are rejected",
    )
    size: int = Field(64, ge=8, le=1024)
    bit_depth: Literal[8, 16] = 8
    channels: Literal[1, 3] = 1
    slice_axis: Literal[0, 1, 2] = 2
    min_foreground: float = Field(0.05, ge=0, le=1)
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    split: SplitSpec = SplitSpec()
    max_pixels: int = Field(
        64 * 1024 * 1024,
        ge=64,
        le=1024 * 1024 * 1024,
        description="largest 2D image (H x W, read from the header before decoding); bigger files are rejected",
    )
    max_voxels: int = Field(
        512**3,
        ge=64,
        le=2048**3,
        description="largest volume (I x J x K, or rows x cols x frames, from the header); bigger files are rejected",
    )
    max_aspect_ratio: float = Field(
        20.0, ge=1, le=1000, description="longest / shortest side of an image or slice above which it is rejected"
    )
    allow_burned_in_annotation: bool = Field(
        False,
        description="ingest DICOM files marked BurnedInAnnotation YES (text in the pixels may identify the "
        "patient); refused by default",
    )

    @model_validator(mode="after")
    def _consistent(self) -> "PreprocessSpec":
        low, high = self.clip_percentiles
        if not 0 <= low < high <= 100:
            raise ValueError(f"clip_percentiles must satisfy 0 <= low < high <= 100, got {list(self.clip_percentiles)}")
        if self.bit_depth == 16 and self.channels == 3:
            raise ValueError("bit_depth 16 needs channels 1 (PNG stores RGB as 8-bit); use bit_depth 8 for RGB")
        if self.dims == 3 and self.channels != 1:
            raise ValueError("dims 3 needs channels 1 (volumes are grey); set channels: 1")
        if self.dims == 2 and (self.patch is not None or self.grid is not None or self.spacing_mm is not None):
            raise ValueError("patch, grid and spacing_mm apply to volumes; set dims: 3 or remove them")
        if self.spacing_mm is not None and min(self.spacing_mm) <= 0:
            raise ValueError(f"spacing_mm must be positive, got {list(self.spacing_mm)}")
        if self.grid is not None and min(self.grid) < 8:
            raise ValueError(f"grid sides must be at least 8 voxels, got {list(self.grid)}")
        return self

    def volume_shape(self) -> tuple[int, int, int]:
        """(D, H, W) of a train-split row (dims 3): the patch cube, else the grid."""
        if self.patch is not None:
            return (self.patch.size,) * 3
        return tuple(self.grid) if self.grid is not None else (self.size,) * 3

    def eval_shape(self) -> tuple[int, int, int]:
        """(D, H, W) of a val/test row (dims 3): ``patch.eval_size`` cubes, else as train."""
        if self.patch is not None and self.patch.eval_size is not None:
            return (self.patch.eval_size,) * 3
        return self.volume_shape()


class GeneratorSpec(Strict):
    """Exactly one of: a registry ``id`` (``name@version``), a search ``query`` (best
    match ranked by ``rank_by``), or a ``train`` block."""

    id: str | None = None
    query: str | None = None
    rank_by: str | None = None
    train: TrainSpec | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "GeneratorSpec":
        given = [k for k in ("id", "query", "train") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of 'id', 'query', 'train'; got {given or 'none'}")
        return self


MAX_IMAGES_PER_CLASS = 1_000_000  # the synthesis plan holds one id per image in memory (~150 bytes each)
MAX_SHARD_ROWS = 65_536
MAX_BATCH_SIZE = 4_096
MAX_SHARD_BYTES = 2 << 30  # synthesis.shard_rows x image bytes: one shard is held in memory before it is written
#: images to make for one class: a whole number in [0, MAX_IMAGES_PER_CLASS] (no floats, no strings)
ImageCount = Annotated[int, Field(ge=0, le=MAX_IMAGES_PER_CLASS, strict=True)]


class SynthesisSpec(Strict):
    """How many images per class; ``counts`` overrides ``count_per_class`` per label.
    ``balance`` tops every class up to the largest real training class instead.
    ``compile``: ``torch.compile`` the generator's network (true/false), or ``auto`` =
    only when the run makes at least ``compile_min_images`` images with an architecture
    measured faster compiled (not DDPM; the one-off compile takes 10-30 s; see
    ``generators/compiled.py``).
    Bounds (checked by ``synthmed validate``): counts are whole numbers in
    [0, :data:`MAX_IMAGES_PER_CLASS`]; ``seed`` in [0, 2**32 - 1]; ``shard_rows`` x image bytes
    at most :data:`MAX_SHARD_BYTES`.

    ``masks_from`` (segmentation augmentation; needs a mask-conditioned generator and
    ``retrain.task: segmentation``): make every image FOR a given mask, written with it as
    the row's mask, bit for bit. ``train``: the real train split's masks, each with its
    row's label; a folder (relative to the project root): one sub-folder per class label
    holding 2D label maps (PNG or NIfTI ``.nii``/``.nii.gz``, integer class indices in
    [0, K) for the generator's K mask classes; a {0, 255} mask is read as {0, 1}), padded to
    a square and resized to ``preprocess.size`` by nearest neighbour as at ingest. Files
    that cannot be read or hold other values or shapes are rejected with a reason (logged
    and listed in the synthetic dataset's provenance), the rest used. Class ``c``'s images
    cycle through class ``c``'s masks (image ``i`` gets mask ``i mod M_c``; a repeated mask
    gets another seed); set ``counts`` to the number of masks for one image per mask."""

    count_per_class: ImageCount = 100
    counts: dict[str, ImageCount] = Field(default_factory=dict)
    balance: bool = False
    shard_rows: int = Field(256, ge=1, le=MAX_SHARD_ROWS, strict=True)
    batch_size: int = Field(64, ge=1, le=MAX_BATCH_SIZE, strict=True)
    seed: Seed = 1234
    compile: Union[bool, Literal["auto"]] = "auto"
    compile_min_images: int = Field(20_000, ge=0)
    masks_from: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        description="'train' (the real train split's masks) or a folder <label>/<mask file> of label maps: "
        "generate images for these masks (mask-conditioned generator, segmentation pipeline)",
    )

    @field_validator("masks_from")
    @classmethod
    def _printable_path(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or not value.isprintable()):
            raise ValueError("expected 'train' or a folder path (printable, not blank)")
        return value

    @field_validator("compile", mode="before")
    @classmethod
    def _true_false_or_auto(cls, value: Any) -> Any:
        if value is True or value is False or value == "auto":
            return value
        raise ValueError("expected true, false or 'auto'")


class SanityFilter(Strict):
    enabled: bool = True
    min_std: float = Field(0.02, ge=0)
    max_saturated_fraction: float = Field(0.5, ge=0, le=1)


class LabelFilter(Strict):
    """A classifier trained on real training images must give the conditioning label
    at least ``min_confidence`` probability."""

    enabled: bool = True
    min_confidence: float = Field(0.5, ge=0, le=1)
    epochs: int = Field(15, ge=1)


class MaskFilter(Strict):
    """Paired (image + mask) synthetic sets, the segmentation twin of label consistency
    (``tasks/mask_filters.py``), calibrated on the real train masks: a mask with a class the
    real masks never hold is dropped; so is an implausible mask (foreground fraction below
    ``foreground_low_scale`` x the real 1st percentile or above ``foreground_high_scale`` x
    the real 99th, empty when no real mask is, or more connected components than
    ``components_scale`` x the real 99th percentile); and a pair whose mask disagrees with
    its image: Dice below ``min_dice`` between the synthetic mask and the mask a MONAI UNet
    (trained ``epochs`` passes over the real train pairs) predicts for the synthetic image.
    The UNet is trusted only when it would drop at most ``max_real_drop_fraction`` of the
    real val pairs; otherwise the agreement filter scores but drops nothing.
    ``enabled``: ``auto`` = on when the synthetic set has masks."""

    enabled: Union[bool, Literal["auto"]] = "auto"
    min_dice: float = Field(0.5, ge=0, le=1)
    epochs: int = Field(30, ge=1)
    foreground_low_scale: float = Field(0.5, ge=0, le=1)
    foreground_high_scale: float = Field(1.5, ge=1)
    components_scale: float = Field(2.0, ge=1)
    max_real_drop_fraction: float = Field(0.1, ge=0, le=1)

    @field_validator("enabled", mode="before")
    @classmethod
    def _true_false_or_auto(cls, value: Any) -> Any:
        if value is True or value is False or value == "auto":
            return value
        raise ValueError("expected true, false or 'auto'")


class NearestNeighbourFilter(Strict):
    """A distance threshold on nearest-neighbour distances, in ``space`` ``pixel`` (RMSE of
    [0, 1] pixels) or ``feature`` (Euclidean, in the features of ``quality.metrics.extractor``).
    ``max_distance`` sets it directly; when null it is calibrated on the real train split:
    ``calibration_scale`` x the ``calibration_quantile`` of the distances from each real image
    to its nearest real image of another subject."""

    enabled: bool = True
    space: Literal["pixel", "feature"] = "pixel"
    max_distance: float | None = Field(None, ge=0)
    calibration_quantile: float = Field(0.05, ge=0, le=1)
    calibration_scale: float = Field(0.5, gt=0)


class MemorisationFilter(NearestNeighbourFilter):
    """Drop synthetic images closer than the threshold to a real TRAIN image (near-copies)."""


class DuplicateFilter(NearestNeighbourFilter):
    """Among synthetic images closer than the threshold to each other, keep only the first by id."""


class SetMetricsSpec(Strict):
    """FID, KID, precision/recall, density/coverage (synthetic vs real train, per class and
    overall) and MS-SSIM diversity. ``extractor``: ``auto`` = ``self_supervised`` (a
    MONAI DenseNet trained contrastively on the real train images for
    ``self_supervised_steps`` steps, without labels and without the filter's classifier, so
    it did not choose the kept set it measures); ``classifier`` = the label-consistency
    classifier's penultimate layer (the network that chose the kept set when the label
    filter is on: its kept-set numbers are biased in their favour, and recorded as such);
    ``inception`` = the standard FID Inception-V3, whose weights file must be given by
    ``inception_weights`` (a path, relative to the project root) or
    ``$SYNTHMED_INCEPTION_WEIGHTS`` (never downloaded); ``random`` = a fixed random-init
    network (a last resort). Every extractor's quality is a linear probe's balanced
    accuracy on real val; below chance + 0.15 it is flagged unreliable and its numbers
    never gate (see QualityGate).
    ``normalisation``: ``auto`` = the extractor's own (self_supervised and classifier:
    unit, inception: symmetric, random: zscore)."""

    enabled: bool = True
    extractor: Literal["auto", "self_supervised", "classifier", "inception", "random"] = "auto"
    self_supervised_steps: int = Field(200, ge=1)
    inception_weights: str | None = None
    normalisation: Literal["auto", "unit", "symmetric", "imagenet", "zscore"] = "auto"
    batch_size: int = Field(64, ge=1)
    kid_subsets: int = Field(100, ge=1)
    kid_subset_size: int = Field(1000, ge=2)
    nearest_k: int = Field(3, ge=1)
    ms_ssim_pairs: int = Field(200, ge=1)
    ms_ssim_kernel_size: int = Field(11, ge=3)

    @field_validator("ms_ssim_kernel_size")
    @classmethod
    def _odd_kernel(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("expected an odd kernel size, e.g. 7 or 11")
        return value


class RealismSpec(Strict):
    """The classifier two-sample test (:mod:`tasks.realism`): a small MONAI CNN trained to
    tell real train images from the kept synthetic ones, cross-validated over ``folds``
    folds (real rows grouped by subject), ``epochs`` passes per fold but at least
    ``min_steps`` optimizer steps (more passes on a small set; why and what it measured:
    ``tasks.realism.passes``), batches of ``batch_size``, Adam ``lr``; at most
    ``max_per_class`` images per side and class (the sides are balanced per class); AUC
    with a 95% cluster-bootstrap interval of ``bootstrap`` resamples, overall and per class.
    0.5 = indistinguishable. Lowering ``min_steps`` weakens the judge: keep it for real
    runs (tests of plumbing set it to 0 for speed)."""

    enabled: bool = True
    folds: int = Field(5, ge=2)
    epochs: int = Field(30, ge=1)
    min_steps: int = Field(300, ge=0)
    batch_size: int = Field(32, ge=2)
    lr: float = Field(1e-3, gt=0)
    bootstrap: int = Field(1000, ge=100)
    max_per_class: int = Field(300, ge=6)


class QualityGate(Strict):
    """Bounds on the kept set (overall, vs real train); crossing one fails the stage with
    QualityGateError after its outputs are written. Null = no bound.

    The realism gate, on by default: ``max_two_sample_auc`` (default 0.9) fails when the
    LOWER end of the two-sample AUC's 95% interval is above it, overall or in any class,
    i.e. when a small CNN tells the synthetic images from real ones with AUC above 0.9
    beyond sampling noise. Measured: noise images and the demo DDPM's kept set give AUC
    1.00 [1.00, 1.00]; held-out real demo slices standing in as synthetic give 0.61
    [0.40, 0.84] (val and test splits, 56 slices, grouped by slab). A test that could not
    run (fewer than 6 images per side) fails the bound.
    With ``realism.enabled: false`` the bound is recorded as not checked (and logged).
    The test runs on the KEPT set (what retraining would use): a class the filters dropped
    entirely, or with fewer than 2 independent groups (subjects/slabs) on a side, has no
    AUC and is not gated (``tasks/realism.py``). Controls on MNI152 (64 px): pipeline
    ``control-noise``, 46 of 150 noise images kept, AUC 1.00 [1.00, 1.00], rejected (exit
    2); ``control-real`` (held-out real val slices, grouped by slab), AUC 0.58 [0.29, 0.87],
    accepted (judge trained >= ``realism.min_steps`` steps per fold).

    ``min_precision`` / ``min_recall`` / ``max_fid`` / ``max_kid`` (realism on set metrics,
    off by default) are checked only on a reliable extractor: on an unreliable one (linear
    probe near chance) such a bound FAILS as "not checked: extractor unreliable", because a
    bound that was asked for and cannot be verified must not pass silently. Fix a failed
    realism bound by improving the generator, never by loosening the bound."""

    max_two_sample_auc: float | None = Field(0.9, ge=0.5, le=1)
    max_fid: float | None = Field(None, ge=0)
    max_kid: float | None = None
    min_precision: float | None = Field(None, ge=0, le=1)
    min_recall: float | None = Field(None, ge=0, le=1)
    max_memorised_fraction: float | None = Field(None, ge=0, le=1)
    min_kept_fraction: float | None = Field(None, ge=0, le=1)


class QualitySpec(Strict):
    """The filter stage: per-sample filters in this order (sanity, label consistency, masks,
    memorisation, near-duplicates), set metrics, and the gate; see ``tasks/filter.py``."""

    sanity: SanityFilter = SanityFilter()
    label_consistency: LabelFilter = LabelFilter()
    masks: MaskFilter = MaskFilter()
    memorisation: MemorisationFilter = MemorisationFilter()
    duplicates: DuplicateFilter = DuplicateFilter()
    metrics: SetMetricsSpec = SetMetricsSpec()
    realism: RealismSpec = RealismSpec()
    gate: QualityGate = QualityGate()

    @model_validator(mode="after")
    def _gate_has_its_inputs(self) -> "QualitySpec":
        set_bounds = ("max_fid", "max_kid", "min_precision", "min_recall")
        used = [name for name in set_bounds if getattr(self.gate, name) is not None]
        if used and not self.metrics.enabled:
            raise ValueError(f"gate.{used[0]} needs metrics.enabled: true; enable the metrics or remove the bound")
        if self.gate.max_memorised_fraction is not None and not self.memorisation.enabled:
            raise ValueError(
                "gate.max_memorised_fraction needs memorisation.enabled: true; enable that filter or remove the bound"
            )
        return self


class AugmentSpec(Strict):
    """albumentations applied to training images of the downstream model."""

    hflip_p: float = Field(0.5, ge=0, le=1)
    rotate_limit_deg: float = Field(10.0, ge=0, le=180)
    rotate_p: float = Field(0.5, ge=0, le=1)
    brightness_contrast_p: float = Field(0.3, ge=0, le=1)


class RetrainSpec(Strict):
    """Downstream model trained on real-only and real+synthetic with the same budget
    (optimizer steps) and seeds, evaluated on the real test split. With ``select_on_val``
    (default) each run keeps the weights that score best on the real val split, checked
    every ``eval_every`` steps (early stopping without stopping: the budget is unchanged).

    Optional sweeps (empty = off): ``ratios`` (synthetic:real ratios, each compared with
    real only) and ``real_fractions`` (a stratified fraction of the real train split,
    real only vs real + ``synthetic_ratio`` synthetic). They train with ``sweep_seeds`` and
    ``sweep_steps`` (default: ``seeds`` and ``steps``); a run whose data, seed and steps
    coincide with another (e.g. ratio 0 = real only) is trained once and reused."""

    task: Literal["classification", "segmentation"] = "classification"
    network: Literal["densenet", "resnet", "unet"] = "densenet"
    steps: int = Field(300, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    seeds: tuple[Seed, ...] = (0, 1, 2)
    synthetic_ratio: float = Field(1.0, ge=0)
    augment: AugmentSpec = AugmentSpec()
    ratios: tuple[Annotated[float, Field(ge=0)], ...] = ()
    real_fractions: tuple[Annotated[float, Field(gt=0, le=1)], ...] = ()
    sweep_seeds: tuple[Seed, ...] | None = None
    sweep_steps: int | None = Field(None, ge=1)
    select_on_val: bool = Field(
        True,
        description="score the real val split every eval_every steps and keep the best weights "
        "(balanced accuracy / mean Dice); the test split is never used for selection",
    )
    eval_every: int = Field(25, ge=1, description="steps between validation scores when select_on_val")
    roi_size: int | None = Field(
        None,
        ge=8,
        le=512,
        description="volumes: side of the cubes the model trains on (random crops) and of the sliding window "
        "it infers with on whole val/test volumes; None: the train rows' size",
    )
    sw_overlap: float = Field(0.25, ge=0, lt=1, description="volumes: sliding-window overlap at inference")

    @model_validator(mode="after")
    def _network_fits_task(self) -> "RetrainSpec":
        fits = {"classification": ("densenet", "resnet"), "segmentation": ("unet",)}
        if self.network not in fits[self.task]:
            raise ValueError(
                f"network '{self.network}' does not fit task '{self.task}'; allowed: {', '.join(fits[self.task])}"
            )
        if not self.seeds:
            raise ValueError("seeds must list at least one seed")
        for key in ("seeds", "ratios", "real_fractions", "sweep_seeds"):
            values = getattr(self, key) or ()
            if len(set(values)) != len(values):
                raise ValueError(f"{key} must not repeat a value, got {list(values)}")
        if self.sweep_seeds is not None and not self.sweep_seeds:
            raise ValueError("sweep_seeds must list at least one seed (or be left out to use seeds)")
        return self


class PreflightSpec(Strict):
    """Checked before any training (``tasks/preflight.py``): images per class in each split
    of the ingested real dataset (segmentation: images with a mask; a dataset without labels
    counts per split). Below a minimum the run stops with one line saying what is missing;
    with ``allow_too_little_data: true`` it goes on and its verdict is "not tested: too little
    data". Defaults: the fewest with which a conditional generator and a classifier see every
    class at all, and every class is scored on val and test."""

    min_train_per_class: int = Field(4, ge=1)
    min_val_per_class: int = Field(1, ge=0)
    min_test_per_class: int = Field(1, ge=1)
    allow_too_little_data: bool = False


class ReportSpec(Strict):
    grid_per_class: int = Field(8, ge=1, le=64)


class StorageSpec(Strict):
    """Where results go besides the project folder. ``results_uri`` (``s3://bucket/prefix``):
    a Prefect run copies ``reports/<pipeline>/`` and ``metrics/<pipeline>/`` to
    ``<results_uri>/<pipeline>/``. Credentials come from the environment, never from here."""

    results_uri: str | None = None

    @field_validator("results_uri")
    @classmethod
    def _results_uri_is_s3(cls, value: str | None) -> str | None:
        return None if value is None else _check_s3_uri(value)


DASK_ADDRESS = re.compile(r"(tcp|tls|ucx|inproc)://\S+")


class RunnerSpec(Strict):
    """Where a ``synthmed run`` makes synthesis shards and downstream retrain runs. Never
    changes what they hold (no stage lists it in its DVC params), only where they run.

    ``kind``: ``local`` (shards in the stage's own loop, retrain runs on ``threads``
    spawned processes), ``threads`` (shards as Prefect tasks on ``workers`` threads) or
    ``dask`` (shards and retrain runs as Prefect tasks on a Dask cluster through
    prefect-dask: ``address`` of a running scheduler, else a local cluster of ``workers``
    processes, one per GPU with ``gpus_per_worker: 1``). A cluster's workers must see the
    project directory at the same path (a shared filesystem; docs/scaleout.md)."""

    kind: Literal["local", "threads", "dask"] = "local"
    workers: int = Field(2, ge=1, le=256, description="threads (threads) or local Dask worker processes (dask)")
    address: str | None = Field(None, description="tcp://host:port of a running Dask scheduler (kind dask)")
    gpus_per_worker: Literal[0, 1] = Field(
        0, description="1: every task needs the Dask worker resource GPU=1 (one worker per GPU)"
    )

    @field_validator("address")
    @classmethod
    def _address_is_a_scheduler(cls, value: str | None) -> str | None:
        if value is not None and not DASK_ADDRESS.fullmatch(value):
            raise ValueError(
                "expected a Dask scheduler address like tcp://host:8786"
            )  # the error formatter adds the value
        return value


class PipelineConfig(Strict):
    """One named pipeline: every stage's parameters."""

    description: str = ""
    seed: Seed = 0
    threads: int = Field(2, ge=1, description="torch CPU threads; fixed for bitwise reproducibility")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    source: Source
    preprocess: PreprocessSpec = PreprocessSpec()
    generator: GeneratorSpec
    synthesis: SynthesisSpec = SynthesisSpec()
    quality: QualitySpec = QualitySpec()
    retrain: RetrainSpec = RetrainSpec()
    preflight: PreflightSpec = PreflightSpec()
    report: ReportSpec = ReportSpec()
    storage: StorageSpec = StorageSpec()
    runner: RunnerSpec = RunnerSpec()

    @model_validator(mode="after")
    def _holdout_control_keeps_val_out_of_selection(self) -> "PipelineConfig":
        train = self.generator.train
        if train is not None and train.architecture == "real-holdout" and self.retrain.select_on_val:
            raise ValueError(
                "generator.train.architecture 'real-holdout' serves the real val split as synthetic data; "
                "set retrain.select_on_val: false so val is not also used for model selection"
            )
        return self

    @model_validator(mode="after")
    def _masks_from_needs_a_mask_conditioned_generator(self) -> "PipelineConfig":
        if self.synthesis.masks_from is None:
            return self
        if self.retrain.task != "segmentation":
            raise ValueError(
                f"synthesis.masks_from makes image+mask pairs for segmentation, but retrain.task is "
                f"'{self.retrain.task}'; set retrain.task: segmentation (network: unet) or remove synthesis.masks_from"
            )
        train = self.generator.train  # a registry generator (id/query) is checked when synthesize loads it
        if train is not None and not (train.architecture in MASK_CONDITIONED_ARCHITECTURES and train.with_masks):
            raise ValueError(
                f"synthesis.masks_from needs a mask-conditioned generator (pix2pix, or ddpm, vae3d or ldm3d with with_masks: true), "
                f"got generator.train.architecture '{train.architecture}' with with_masks: {str(train.with_masks).lower()}; "
                "change the generator or remove synthesis.masks_from"
            )
        return self

    @model_validator(mode="after")
    def _generator_fits_dims(self) -> "PipelineConfig":
        train = self.generator.train
        if train is None or train.architecture in ("noise", "blobs", "real-holdout"):
            return self
        if (train.architecture in VOLUME_ARCHITECTURES) != (self.preprocess.dims == 3):
            raise ValueError(
                f"generator.train.architecture '{train.architecture}' does not fit preprocess.dims "
                f"{self.preprocess.dims}; use vae3d or ldm3d for dims 3, a 2D architecture for dims 2"
            )
        return self

    @model_validator(mode="after")
    def _shard_fits_in_memory(self) -> "PipelineConfig":
        pre = self.preprocess
        image_bytes = pre.size * pre.size * pre.channels * (pre.bit_depth // 8)
        shown = f"{pre.size}x{pre.size} image"
        if pre.dims == 3:
            depth, height, width = pre.volume_shape()
            image_bytes = depth * height * width * (pre.bit_depth // 8)
            shown = f"{depth}x{height}x{width} volume"
        shard_bytes = self.synthesis.shard_rows * image_bytes
        if shard_bytes > MAX_SHARD_BYTES:
            fitting = max(1, MAX_SHARD_BYTES // image_bytes)
            raise ValueError(
                f"synthesis.shard_rows {self.synthesis.shard_rows} x {image_bytes:,} bytes per "
                f"{shown} = {shard_bytes / 2**30:.1f} GiB per shard in memory; at most "
                f"{MAX_SHARD_BYTES / 2**30:.0f} GiB: set shard_rows <= {fitting}"
            )
        return self


class PipelinesFile(Strict):
    pipelines: dict[str, PipelineConfig]

    @field_validator("pipelines")
    @classmethod
    def _names_are_safe(cls, value: dict[str, PipelineConfig]) -> dict[str, PipelineConfig]:
        for name in value:
            if not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"pipeline name '{name}' must be letters, digits, '-' or '_'")
        return value


# --------------------------------------------------------------------------- errors
def _allowed_keys(model: type[BaseModel] | None) -> list[str]:
    return sorted(model.model_fields) if model else []


SOURCES_BY_KIND: dict[str, type[BaseModel]] = {
    "folder": FolderSource,
    "csv": CsvSource,
    "mni152": Mni152Source,
    "s3": S3Source,
}


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model that owns the last key of an error location (for listing allowed keys)."""
    parts = list(loc[:-1])
    model: type[BaseModel] | None = PipelinesFile
    i = 0
    while i < len(parts) and model is not None:
        part = parts[i]
        if model is PipelinesFile and part == "pipelines":
            model, i = PipelineConfig, i + 2  # skip the pipeline's name
            continue
        if part == "source" and model is PipelineConfig:
            tag = parts[i + 1] if i + 1 < len(parts) else None
            model, i = SOURCES_BY_KIND.get(str(tag)), i + 2
            continue
        field = model.model_fields.get(str(part))
        candidates = (field.annotation, *get_args(field.annotation)) if field else ()
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        i += 1
    return model


MAX_PROBLEMS_SHOWN = 5
MAX_INPUT_CHARS = 60
_USERINFO = re.compile(r"(://)[^/@\s'\"]*@")
_REPR = reprlib.Repr()  # bounded: a few items per level, two levels deep
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 2, 4, 4, 4, 4
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = MAX_INPUT_CHARS, 40, 40


def _short(value: Any) -> str:
    """``repr`` of a user value, cut to :data:`MAX_INPUT_CHARS`; bounded work however big
    the value (inputs can be whole sections: ``reprlib`` looks at a few items per level)."""
    text = _USERINFO.sub(r"\1***@", _REPR.repr(value))  # never echo credentials in a URL
    return text if len(text) <= MAX_INPUT_CHARS else text[: MAX_INPUT_CHARS - 3] + "..."


def _flat(text: str) -> str:
    return " ".join(text.split())


def format_validation_error(error: ValidationError, origin: str) -> str:
    """One line: ``origin: dotted.key: message; allowed: ... (did you mean ...?)``; several
    problems are joined by ``; `` (the first :data:`MAX_PROBLEMS_SHOWN`, then a count)."""
    lines = []
    for item in error.errors():
        loc = tuple(item["loc"])
        key = _flat(".".join(str(p) for p in loc)) or "(top level)"
        if item["type"] == "extra_forbidden":
            allowed = _allowed_keys(_model_at(loc))
            guess = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f" (did you mean '{guess[0]}'?)" if guess else ""
            lines.append(f"{key}: unknown key; allowed: {', '.join(allowed)}{hint}")
            continue
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "literal_error":
            expected = item.get("ctx", {}).get("expected", "")
            options = [o.strip(" '") for o in expected.replace(" or ", ",").split(",") if o.strip()]
            guess = difflib.get_close_matches(str(item.get("input")), options, n=1)
            hint = f" (did you mean '{guess[0]}'?)" if guess else ""
            lines.append(f"{key}: got {_short(item.get('input'))}; allowed: {expected}{hint}")
            continue
        if item["type"] == "union_tag_invalid":
            lines.append(f"{key}: {_flat(message)}")
            continue
        lines.append(f"{key}: {_flat(message)} (got {_short(item.get('input'))})")
    shown = lines[:MAX_PROBLEMS_SHOWN]
    more = f"; and {len(lines) - len(shown)} more problem(s)" if len(lines) > len(shown) else ""
    return f"{origin}: " + "; ".join(shown) + more


# --------------------------------------------------------------------------- loading
def load_pipelines(path: Path | str = DEFAULT_CONFIG) -> PipelinesFile:
    """Parse and validate a pipelines file; raises ConfigError with a one-line message."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: pipelines file not found; pass --config PATH to an existing YAML")
    data = load_yaml(path, what="pipelines file")  # size, alias and duplicate-key bounds
    if not isinstance(data, dict) or "pipelines" not in data:
        raise ConfigError(f"{path}: expected a mapping with a top-level 'pipelines:' key, got {type(data).__name__}")
    try:
        return PipelinesFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, path.name)) from None


def load_pipeline(name: str, path: Path | str = DEFAULT_CONFIG) -> PipelineConfig:
    """One named pipeline; an unknown name lists the known ones."""
    pipelines = load_pipelines(path).pipelines
    if name not in pipelines:
        guess = difflib.get_close_matches(name, list(pipelines), n=1)
        hint = f" (did you mean '{guess[0]}'?)" if guess else ""
        raise ConfigError(f"{Path(path).name}: no pipeline named '{name}'; known: {', '.join(sorted(pipelines))}{hint}")
    return pipelines[name]
