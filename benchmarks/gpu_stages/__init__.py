"""The stages of ``benchmarks/gpu_check.sh``, one module each (the throughput ones share one), and what
they share: the mode (device and sizes), the report a stage writes, and a run built as the trainer builds
it. ``benchmarks/gpu_check.py`` holds their order, their timeouts and the command line.
"""
