"""A torchrun entry point for tests: ``gan_dist.train`` with one rank's monotonic clock 10⁶× fast.

``FAST_CLOCK_RANK`` names the rank. Its checkpointer then finds a timed save due at every step,
while the other ranks' clocks say no: only an agreement that lets rank 0 decide keeps them in step.
"""

import os
import sys
import time
import types

import gan_dist.train
import gan_dist.training.checkpointer

if os.environ["RANK"] == os.environ["FAST_CLOCK_RANK"]:
    origin = time.monotonic()
    fast = types.SimpleNamespace(monotonic=lambda: origin + (time.monotonic() - origin) * 1e6)
    gan_dist.training.checkpointer.time = fast
sys.exit(gan_dist.train.main())
