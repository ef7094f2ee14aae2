"""Tools that measure and check gan_dist from a checkout (not part of the installed package).

Run them from the repository root: ``python benchmarks/bench.py`` (or ``python -m benchmarks.bench``),
``bash benchmarks/gpu_check.sh``, ``python benchmarks/colour_fashion.py``.
"""
