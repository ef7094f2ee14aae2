"""gan_dist: distributed, resumable training of conditional GANs."""

__version__ = "0.1.0"
