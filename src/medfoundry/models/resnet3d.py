"""3D ResNets for volumes, from MONAI's ``ResNet``, with the surface the rest of medfoundry expects.

timm has no 3D CNNs; MONAI's ResNet (the MedicalNet / Med3D layout: ResNet-10 to -200 with 3D convolutions) is
the standard one in radiology. This wrapper fixes what the :class:`~medfoundry.models.backbones.Encoder` needs:
``num_features``, ``spatial_dims = 3``, and ``forward(x) -> (B, num_features)`` pooled features (MONAI's own
forward adds a classification layer unless ``feed_forward=False``). The network is fully convolutional, so any
volume size of at least 16 voxels per axis works; there is no fixed input size.
"""

from __future__ import annotations

import torch
from monai.networks.nets import resnet
from torch import nn

from medfoundry.errors import ModelError

#: The architecture name written to a checkpoint's config.json.
RESNET3D_ARCHITECTURE = "medfoundry.resnet3d"

# MONAI's block type and blocks per stage for each depth (as torchvision's and MedicalNet's).
_DEPTHS: dict[int, tuple[str, list[int]]] = {
    10: ("basic", [1, 1, 1, 1]),
    18: ("basic", [2, 2, 2, 2]),
    34: ("basic", [3, 4, 6, 3]),
    50: ("bottleneck", [3, 4, 6, 3]),
}


class ResNet3D(nn.Module):
    """A MONAI 3D ResNet without its classification layer; ``forward`` returns globally pooled features."""

    spatial_dims = 3

    def __init__(
        self, depth: int = 18, in_chans: int = 1, widen_factor: float = 1.0, no_max_pool: bool = False
    ) -> None:
        super().__init__()
        if depth not in _DEPTHS:
            raise ModelError(f"3D ResNet depth must be one of {sorted(_DEPTHS)}, got {depth}")
        block, layers = _DEPTHS[depth]
        self.in_chans = in_chans
        # conv1 stride 2 and (unless no_max_pool) a max-pool: a 28^3 MedMNIST-3D volume reaches layer4 at 1^3,
        # which still works; small inputs benefit from no_max_pool=True.
        self.net = resnet.ResNet(
            block,
            layers,
            resnet.get_inplanes(),
            spatial_dims=3,
            n_input_channels=in_chans,
            conv1_t_stride=2,
            no_max_pool=no_max_pool,
            widen_factor=widen_factor,
            feed_forward=False,
        )
        expansion = 4 if block == "bottleneck" else 1
        self.num_features = int(resnet.get_inplanes()[-1] * widen_factor) * expansion

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise ModelError(f"a 3D ResNet takes volumes (B, C, D, H, W); got shape {tuple(x.shape)}")
        return self.net(x)
