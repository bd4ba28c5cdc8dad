"""dlmuse-bids: DLMUSE brain segmentation for BIDS datasets."""

__version__ = "0.1.0"
