"""Segmentation probe: a frozen 3D encoder's patch tokens, a light decoder, Dice per class with bootstrap CIs."""

from medfoundry.segment.config import SegmentProbeConfig, SegmentSplitConfig
from medfoundry.segment.heads import LinearSegHead, SegmentationProbe, UNETRDecoder, build_probe
from medfoundry.segment.train import run_segment_probe

__all__ = [
    "LinearSegHead",
    "SegmentProbeConfig",
    "SegmentSplitConfig",
    "SegmentationProbe",
    "UNETRDecoder",
    "build_probe",
    "run_segment_probe",
]
