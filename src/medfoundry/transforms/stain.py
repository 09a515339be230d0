"""Macenko stain normalisation: fit on a reference H&E tile, map other tiles onto its stain colours.

Macenko et al. 2009 (A method for normalizing histology slides for quantitative analysis, ISBI): optical
density ``OD = -log((rgb + 1) / Io)``, pixels with any channel below ``beta`` are dropped as glass, the two
stain vectors are the ``alpha`` and ``100 - alpha`` percentile angles in the plane of the two main OD
eigenvectors (haematoxylin first: the one absorbing more red), and concentrations come from least squares.
A tile is normalised by rescaling its concentrations so their 99th percentiles match the reference's and
rebuilding RGB with the reference's stain vectors.

The stain estimate is torchstain's numpy backend (``NumpyMacenkoNormalizer.fit``, public API only), a port of
the reference implementation that the field uses, so our vectors agree with other tools'. The rebuild is done
here rather than with torchstain's ``normalize`` because that method re-estimates the stains without letting
us check the estimate first (a white tile crashes inside numpy's eigen solver, a flat tile yields two equal
"stains" and a garbage image) and truncates instead of rounding back to uint8.

Tiles without enough tissue are a normal part of a slide, so at embed time the default is to pass them through
unchanged and count them (``on_failure="passthrough"``); fitting a reference always raises.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from medfoundry.errors import DataError
from medfoundry.extras import lazy

# Imported on first use: the [stain] extra.
NumpyMacenkoNormalizer = lazy("torchstain.numpy.normalizers", "stain", "NumpyMacenkoNormalizer")

OnFailure = Literal["passthrough", "raise"]

_FORMAT = "medfoundry.macenko"
_VERSION = 1
# On real H&E tiles (NCT-CRC, TCIA osteosarcoma) the two Macenko vectors have cosine 0.87-0.98; 0.999 and above
# means the tile shows one colour only and the "two stains" are the same vector.
_MAX_STAIN_COSINE = 0.999


@dataclass(frozen=True)
class StainEstimate:
    """One tile's stains: unit OD vectors (3 x 2, columns haematoxylin then eosin), and each stain's 99th
    percentile concentration."""

    stain_matrix: np.ndarray
    max_concentrations: np.ndarray


def as_rgb_tile(rgb: Any) -> np.ndarray:
    """The tile as a (H, W, 3) uint8 array, or a DataError saying what it is instead."""
    array = np.asarray(rgb)
    if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise DataError(f"Macenko normalisation needs (H, W, 3) uint8 RGB tiles, got {array.dtype} {array.shape}")
    return array


def optical_density(rgb: np.ndarray, io: float) -> np.ndarray:
    """(N, 3) optical densities; +1 keeps black pixels finite (as in Macenko's and torchstain's code)."""
    return -np.log((rgb.reshape(-1, 3).astype(np.float64) + 1.0) / io)


def tissue_fraction(rgb: np.ndarray, io: float = 240.0, beta: float = 0.15) -> float:
    """Share of pixels that Macenko keeps as stained (every channel's OD at least ``beta``)."""
    return float(np.all(optical_density(rgb, io) >= beta, axis=1).mean())


def estimate_stains(
    rgb: np.ndarray,
    *,
    io: float = 240.0,
    alpha: float = 1.0,
    beta: float = 0.15,
    min_tissue_fraction: float = 0.01,
) -> StainEstimate:
    """The tile's Macenko stain vectors and max concentrations; DataError when they cannot be estimated."""
    rgb = as_rgb_tile(rgb)
    fraction = tissue_fraction(rgb, io, beta)
    if fraction < min_tissue_fraction:
        raise DataError(
            f"too little tissue to estimate stains: {fraction:.1%} of pixels stained, "
            f"need {min_tissue_fraction:.1%} (blank, background or out-of-focus tile?)"
        )
    backend = NumpyMacenkoNormalizer()
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            # numpy's warnings here only announce the degenerate cases checked below.
            warnings.simplefilter("ignore", RuntimeWarning)
            backend.fit(rgb, Io=io, alpha=alpha, beta=beta)
    except (np.linalg.LinAlgError, ValueError) as error:
        raise DataError(f"cannot estimate stains: {error}") from None
    estimate = StainEstimate(np.asarray(backend.HERef, dtype=np.float64), np.asarray(backend.maxCRef, np.float64))
    check_estimate(estimate)
    return estimate


def check_estimate(estimate: StainEstimate) -> None:
    """Reject estimates that would turn a tile into noise rather than a re-stained tile."""
    matrix, max_c = estimate.stain_matrix, estimate.max_concentrations
    if matrix.shape != (3, 2) or max_c.shape != (2,):
        raise DataError(f"stain matrix must be 3 x 2 and max concentrations 2, got {matrix.shape} and {max_c.shape}")
    if not (np.isfinite(matrix).all() and np.isfinite(max_c).all()):
        raise DataError("cannot estimate stains: the estimate is not finite")
    if (max_c <= 1e-6).any():
        raise DataError(f"cannot estimate stains: a stain is absent (99th percentile concentrations {max_c.round(4)})")
    norms = np.linalg.norm(matrix, axis=0)
    if abs(float(matrix[:, 0] @ matrix[:, 1]) / float(norms[0] * norms[1])) >= _MAX_STAIN_COSINE:
        raise DataError("cannot separate two stains: the tile shows a single colour")


def restain(rgb: np.ndarray, source: StainEstimate, target: StainEstimate, io: float) -> np.ndarray:
    """Rebuild ``rgb`` with ``target``'s stain vectors, its concentrations scaled to ``target``'s maxima."""
    density = optical_density(rgb, io)
    concentrations = np.linalg.lstsq(source.stain_matrix, density.T, rcond=None)[0]
    concentrations *= (target.max_concentrations / source.max_concentrations)[:, None]
    rebuilt = io * np.exp(-(target.stain_matrix @ concentrations))
    return np.clip(rebuilt.T, 0.0, 255.0).round().astype(np.uint8).reshape(rgb.shape)


class MacenkoNormalizer:
    """Macenko stain normalisation onto one reference tile.

    ``passed_through`` counts tiles returned unchanged under ``on_failure="passthrough"``. In DataLoader
    workers each worker counts in its own copy, so read it in the main process only when not using workers.
    """

    def __init__(
        self,
        *,
        on_failure: OnFailure = "passthrough",
        io: float = 240.0,
        alpha: float = 1.0,
        beta: float = 0.15,
        min_tissue_fraction: float = 0.01,
    ) -> None:
        if on_failure not in ("passthrough", "raise"):
            raise DataError(f"on_failure must be 'passthrough' or 'raise', got {on_failure!r}")
        if not (0 < io <= 255 and 0 <= alpha < 50 and beta >= 0 and 0 <= min_tissue_fraction <= 1):
            raise DataError(
                f"bad Macenko parameters: io={io}, alpha={alpha}, beta={beta}, "
                f"min_tissue_fraction={min_tissue_fraction}"
            )
        self.on_failure: OnFailure = on_failure
        self.io = float(io)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.min_tissue_fraction = float(min_tissue_fraction)
        self.reference: StainEstimate | None = None
        self.passed_through = 0

    def estimate(self, rgb: np.ndarray) -> StainEstimate:
        """``rgb``'s stains under this normaliser's parameters (raises DataError whatever ``on_failure``)."""
        return estimate_stains(
            rgb, io=self.io, alpha=self.alpha, beta=self.beta, min_tissue_fraction=self.min_tissue_fraction
        )

    def fit(self, reference: np.ndarray) -> MacenkoNormalizer:
        """Take the target stain colours from a reference tile; a reference without usable tissue always raises."""
        self.reference = self.estimate(reference)
        return self

    def transform(self, rgb: np.ndarray) -> np.ndarray:
        """The tile (H, W, 3) uint8 re-stained like the reference, same shape and dtype."""
        if self.reference is None:
            raise DataError("the Macenko normaliser is not fitted: call fit() on a reference tile or load() one")
        rgb = as_rgb_tile(rgb)
        try:
            source = self.estimate(rgb)
        except DataError:
            if self.on_failure == "raise":
                raise
            self.passed_through += 1
            return rgb
        return restain(rgb, source, self.reference, self.io)

    __call__ = transform

    def to_dict(self) -> dict[str, Any]:
        if self.reference is None:
            raise DataError("the Macenko normaliser is not fitted: nothing to save")
        matrix, max_c = self.reference.stain_matrix, self.reference.max_concentrations
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "stain_vectors_od": {"haematoxylin": matrix[:, 0].tolist(), "eosin": matrix[:, 1].tolist()},
            "max_concentrations": {"haematoxylin": float(max_c[0]), "eosin": float(max_c[1])},
            "io": self.io,
            "alpha": self.alpha,
            "beta": self.beta,
            "min_tissue_fraction": self.min_tissue_fraction,
        }

    def save(self, path: str | Path) -> None:
        """Write the fitted reference as JSON (floats round-trip exactly, so a loaded copy gives identical tiles)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any], on_failure: OnFailure = "passthrough") -> MacenkoNormalizer:
        if not isinstance(data, dict) or data.get("format") != _FORMAT or data.get("version") != _VERSION:
            raise DataError(f"not a Macenko reference (format {_FORMAT!r}, version {_VERSION})")
        try:
            vectors, max_c = data["stain_vectors_od"], data["max_concentrations"]
            normalizer = cls(
                on_failure=on_failure,
                io=data["io"],
                alpha=data["alpha"],
                beta=data["beta"],
                min_tissue_fraction=data["min_tissue_fraction"],
            )
            matrix = np.array([vectors["haematoxylin"], vectors["eosin"]], dtype=np.float64).T
            maxima = np.array([max_c["haematoxylin"], max_c["eosin"]], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(f"malformed Macenko reference: {type(error).__name__} {error}") from None
        reference = StainEstimate(matrix, maxima)
        check_estimate(reference)
        normalizer.reference = reference
        return normalizer

    @classmethod
    def load(cls, path: str | Path, on_failure: OnFailure = "passthrough") -> MacenkoNormalizer:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            return cls.from_dict(data, on_failure)
        except OSError as error:
            raise DataError(f"cannot read Macenko reference: {error.strerror}", path) from None
        except json.JSONDecodeError as error:
            raise DataError(f"Macenko reference is not JSON: {error}", path) from None
        except DataError as error:
            raise DataError(str(error), path) from None

    def __repr__(self) -> str:
        state = "fitted" if self.reference is not None else "not fitted"
        return f"{type(self).__name__}({state}, on_failure={self.on_failure!r}, passed_through={self.passed_through})"


def _is_plain_tensor(value: Any) -> bool:
    # Masks and boxes are tensors too; only plain tensors and tv_tensors.Image are images to re-stain.
    return isinstance(value, torch.Tensor) and not isinstance(value, tv_tensors.TVTensor)


class MacenkoTransform(v2.Transform):
    """A torchvision v2 step: re-stain PIL RGB images and uint8 (3, H, W) or (N, 3, H, W) tensors.

    Deterministic (no random draw), so it can sit anywhere in a view pipeline or in a tile dataset's
    ``__getitem__``; masks and other tv_tensors in the sample pass through untouched.
    """

    _transformed_types = (Image.Image, tv_tensors.Image, _is_plain_tensor)

    def __init__(self, normalizer: MacenkoNormalizer) -> None:
        super().__init__()
        if normalizer.reference is None:
            raise DataError("MacenkoTransform needs a fitted normaliser: call fit() on a reference tile or load() one")
        self.normalizer = normalizer

    @classmethod
    def from_file(cls, path: str | Path, on_failure: OnFailure = "passthrough") -> MacenkoTransform:
        return cls(MacenkoNormalizer.load(path, on_failure))

    @property
    def passed_through(self) -> int:
        return self.normalizer.passed_through

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, Image.Image):
            return self._transform_pil(inpt)
        return self._transform_tensor(inpt)

    def _transform_pil(self, image: Image.Image) -> Image.Image:
        if image.mode != "RGB":
            raise DataError(f"Macenko normalisation needs RGB (H&E) images, got a {image.mode} image")
        return Image.fromarray(self.normalizer.transform(np.asarray(image)))

    def _transform_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dtype != torch.uint8 or tensor.ndim not in (3, 4) or tensor.shape[-3] != 3:
            raise DataError(
                f"Macenko normalisation needs uint8 (3, H, W) or (N, 3, H, W) tensors, got {tensor.dtype} "
                f"{tuple(tensor.shape)}; place it before ToDtype"
            )
        tiles = tensor.detach().cpu().reshape(-1, *tensor.shape[-3:]).permute(0, 2, 3, 1).numpy()
        done = np.stack([self.normalizer.transform(np.ascontiguousarray(tile)) for tile in tiles])
        out = torch.from_numpy(done).permute(0, 3, 1, 2).reshape(tensor.shape).contiguous().to(tensor.device)
        return tv_tensors.wrap(out, like=tensor) if isinstance(tensor, tv_tensors.TVTensor) else out

    def extra_repr(self) -> str:
        return repr(self.normalizer)
