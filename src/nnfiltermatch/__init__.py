"""nnFilterMatch: semi-supervised nnU-Net training with an entropy filter on the unlabelled pool."""

import os

# MKL picks code paths by the memory alignment of its inputs, and where tensors land depends on what the process did
# before (an evaluation between two trainings was enough), so the same seed gave different models. Strict
# conditional numerical reproducibility makes the results independent of alignment, at no measured cost. MKL reads
# this once, at its first call, so it is set here, before torch is imported through this package.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.1.0"
