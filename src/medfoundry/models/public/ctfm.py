"""CT-FM's 3D encoder: MONAI's ``SegResEncoder`` with CT-FM's depth, pooled to one vector per volume.

CT-FM (project-lighter) publishes its feature extractor as ``lighter_zoo.SegResEncoder``, a thin hub wrapper
around ``monai.networks.nets.segresnet_ds.SegResEncoder`` built with ``blocks_down=(1, 2, 2, 4, 4)`` and a head
that average-pools the last level. Subclassing MONAI's network (rather than wrapping it) keeps the parameter
names identical to the published weights, so no key mapping is needed; the pooled head lives in ``forward``
because the published one is a lambda, which has no parameters and cannot be written to ``config.json``.
"""

from __future__ import annotations

import torch
from monai.networks.nets.segresnet_ds import SegResEncoder

from medfoundry.models.backbones import ARCHITECTURES

#: The architecture name written to config.json (not a timm name: timm has no 3D CNNs).
CTFM_ARCHITECTURE = "medfoundry.ctfm_segresencoder"


@ARCHITECTURES.register(CTFM_ARCHITECTURE)
class CTFMEncoder(SegResEncoder):
    """SegResEncoder returning the global average of its deepest feature map, ``(B, init_filters * 2**(L-1))``."""

    def __init__(
        self,
        in_chans: int = 1,
        init_filters: int = 32,
        blocks_down: tuple[int, ...] | list[int] = (1, 2, 2, 4, 4),
        act: str = "relu",
        norm: str = "batch",
        spatial_dims: int = 3,
    ) -> None:
        super().__init__(
            spatial_dims=spatial_dims,
            init_filters=init_filters,
            in_channels=in_chans,
            act=act,
            norm=norm,
            blocks_down=tuple(blocks_down),
        )
        self.num_features = init_filters * 2 ** (len(blocks_down) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        deepest = self._forward(x)[-1]
        return deepest.flatten(2).mean(dim=-1)
