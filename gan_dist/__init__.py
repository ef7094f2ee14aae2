"""gan_dist: distributed, resumable training of conditional GANs.

Importing the package registers the built-in architectures, losses and datasets, so a config is
always checked against every name it may use.
"""

__version__ = "0.1.0"

from gan_dist import losses, models, sources  # noqa: E402, F401  (registration)
