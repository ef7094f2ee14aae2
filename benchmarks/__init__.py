"""What measures gan_dist from a checkout (not part of the installed package): speed, the GPU check, quality
ablations and the peer side by side. ``tools/`` makes the data they run on.

Run them from the repository root: ``python benchmarks/bench.py`` (or ``python -m benchmarks.bench``),
``bash benchmarks/gpu_check.sh``, ``python benchmarks/ablate.py``.
"""
