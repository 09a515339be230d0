"""A PNG of one axial slice of a test block: the CT with the reference labels and each decoder's prediction."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from medfoundry.io_utils import atomic_path
from medfoundry.segment.data import Block


def _axial(array: np.ndarray) -> np.ndarray:
    # (x, y) in RAS+ to radiological display: anterior at the top, the patient's right on the viewer's left.
    return array[::-1, ::-1].T


def save_overlay(
    path: Path,
    block: Block,
    predictions: Mapping[str, np.ndarray],
    class_names: Sequence[str],
    z: int | None = None,
) -> Path:
    """CT slice ``z`` (default: the block's middle) with labels, then each prediction, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    z = block.image.shape[-1] // 2 if z is None else z
    ct = _axial(block.image[0, :, :, z])
    panels = {"reference labels": block.labels[0]} | dict(predictions)
    colours = plt.get_cmap("tab10").colors
    cmap = ListedColormap([(0, 0, 0, 0)] + [(*colours[k % 10], 0.55) for k in range(len(class_names) - 1)])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, (title, labels) in zip(axes[0], panels.items(), strict=True):
        ax.imshow(ct, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.imshow(_axial(labels[:, :, z]), cmap=cmap, vmin=0, vmax=len(class_names) - 1, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_axis_off()
    handles = [Patch(color=colours[k % 10], label=name) for k, name in enumerate(class_names[1:])]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    z_world = block.z_range[0] + z
    fig.suptitle(f"{block.volume}: axial slice z={z_world} (held-out test block)", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    with atomic_path(Path(path)) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return Path(path)
