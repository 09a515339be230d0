"""The segmentation probe's typed settings: a task's volumes, classes and decoders, and the probe's recipe.

:class:`SegmentTaskConfig` is what a suite's segmentation task holds (``tasks[i].segmentation`` in a suite YAML);
:class:`SegmentProbeConfig` adds what ``medfoundry segment-probe`` runs it with (the encoder, the seed, the
bootstrap, the output folder) and is the flat YAML recipe of configs/segment/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

# From settings, not medfoundry.config: config validates a suite's segmentation tasks with these classes.
from medfoundry.settings import StrictModel


class SegmentSplitConfig(StrictModel):
    """One contiguous test block along z (fractions of the slices), a margin, and the bootstrap unit."""

    test_start: float = Field(0.35, ge=0.0, lt=1.0, description="test block start, fraction of the z slices")
    test_stop: float = Field(0.65, gt=0.0, le=1.0, description="test block end (exclusive), fraction of the z slices")
    margin_slices: int = Field(2, ge=0, description="slices left out between the test block and train blocks")
    unit_slices: int = Field(2, ge=1, description="thickness of the test slabs the bootstrap resamples")
    unit: Literal["auto", "slab", "volume"] = Field(
        "auto", description="bootstrap unit: z slabs, whole volumes, or auto (volumes when 5 or more are given)"
    )


class SegmentTaskConfig(StrictModel):
    """A segmentation task: labelled CT volumes, the classes, the z split, and the decoders trained on each encoder."""

    images: list[Path] = Field(default_factory=list, description="CT volumes (NIfTI files or DICOM folders)")
    labels: list[Path] = Field(default_factory=list, description="label maps, one per image, on the same grid")
    label_names: Path | None = Field(None, description="label,name CSV; default labels_total.csv beside the labels")
    classes: list[str] = Field(default_factory=lambda: ["liver", "spleen", "kidney_left", "kidney_right"])
    merge_left_right: bool = Field(False, description="one class for a *_left/*_right pair, e.g. kidney")
    decoders: list[Literal["linear", "unetr"]] = Field(default_factory=lambda: ["linear", "unetr"])
    linear_blocks: list[int] | None = Field(None, description="encoder blocks (1-based) for the linear head")
    unetr_blocks: list[int] | None = Field(None, description="encoder blocks for UNETR, log2(patch size) of them")
    feature_size: int = Field(16, ge=2, description="UNETR decoder width at full resolution")
    window: str | tuple[float, float] = Field("soft_tissue", description="CT window preset or (level, width) HU")
    spacing: float | None = Field(None, gt=0, description="resample to this isotropic spacing (mm) first")
    split: SegmentSplitConfig = Field(default_factory=SegmentSplitConfig)
    steps: int = Field(300, ge=1, description="decoder training steps")
    batch_size: int = Field(4, ge=1, description="crops per step")
    crop_pool: int = Field(256, ge=0, description="crops drawn once with cached encoder tokens; 0: fresh every step")
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    sw_overlap: float = Field(0.5, ge=0.0, lt=1.0, description="sliding-window overlap at inference")
    sw_batch_size: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> SegmentTaskConfig:
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} image(s) but {len(self.labels)} label map(s): give one per image")
        if self.split.test_stop <= self.split.test_start:
            raise ValueError("split.test_stop must be larger than split.test_start")
        if len(set(self.decoders)) != len(self.decoders) or not self.decoders:
            raise ValueError(f"decoders must be distinct and at least one, got {self.decoders}")
        return self

    def training(self, decoder: str) -> dict[str, object]:
        """What ``decoder``'s cells depend on besides the data (hashed apart) and the encoder: adding a decoder or
        changing another one's blocks leaves its finished cells valid."""
        others = {name for name in type(self).model_fields if name.endswith("_blocks") and name != f"{decoder}_blocks"}
        return self.model_dump(mode="json", exclude={"images", "labels", "label_names", "decoders", *others})


class SegmentProbeConfig(SegmentTaskConfig):
    """``medfoundry segment-probe``: one segmentation task on one encoder, run as a one-task suite."""

    name: str = Field(
        "totalseg_organs",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="task name in results.json, the report and file names",
    )
    encoder: str = Field("vit3d_tiny_32", description="checkpoint folder, or a 3D ViT preset (random weights)")
    encoder_seed: int = Field(0, description="seed of a preset's random initialisation")
    n_bootstrap: int = Field(1000, ge=0)
    confidence: float = Field(0.95, gt=0.0, lt=1.0)
    seed: int = 0
    output_dir: Path = Path("runs/segment-probe")

    def task(self) -> SegmentTaskConfig:
        """The task part of the recipe, as a suite's segmentation task holds it."""
        return SegmentTaskConfig.model_validate(self.model_dump(include=set(SegmentTaskConfig.model_fields)))
