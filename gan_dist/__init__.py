"""gan_dist: distributed, resumable training of conditional GANs.

Importing the package, or its config, loads no torch: the built-in architectures, losses and datasets
register themselves when a config first looks one up.
"""

__version__ = "0.1.0"
