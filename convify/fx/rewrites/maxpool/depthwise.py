"""``mode="depthwise"``: the strided convolution grouped per channel (``groups=C``)."""
from __future__ import annotations

import torch.fx as fx

from convify.core.report import Replaced
from convify.core.rewrites.maxpool import DEPTHWISE, MaxPoolOptions, PoolParams
from convify.fx.rewrites.base import Site
from convify.fx.rewrites.maxpool.modes import FxPoolMode, pool_mode
from convify.fx.rewrites.maxpool.strided import strided_conv


@pool_mode(DEPTHWISE)
class Depthwise(FxPoolMode):
    def apply(self, gm: fx.GraphModule, site: Site[PoolParams], options: MaxPoolOptions) -> Replaced:
        return strided_conv(gm, site, options, mode=self.mode.name, depthwise=True)
