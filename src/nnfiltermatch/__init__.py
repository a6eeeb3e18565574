"""nnFilterMatch: semi-supervised nnU-Net training with an entropy filter on the unlabelled pool."""

__version__ = "0.1.0"
