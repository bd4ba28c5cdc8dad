"""Test support: random-weight nnU-Net v2 model folders and runners for the reference engines."""
