"""Stage ``preflight``: what the machine is, how fast it can go, and whether the data is there."""

import platform
import time

import torch

from benchmarks.bench_worker import matmul_ceiling
from benchmarks.gpu_stages.mode import Mode
from benchmarks.gpu_stages.report import Report
from gan_dist.config import DataError
from gan_dist.dist import setup, usable_cores
from gan_dist.training.trainer import build


def launch_us(device: torch.device, n: int = 2000) -> float:
    """Host µs per launch of a one-element kernel from eager PyTorch: the floor of an eager step."""
    x = torch.zeros(1, device=device)
    for _ in range(100):
        x.add_(1)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(n):
        x.add_(1)
    torch.cuda.synchronize(device)
    return 1e6 * (time.perf_counter() - start) / n


def graph_kernel_us(device: torch.device, n: int = 1000) -> float:
    """µs per kernel of the same launch replayed from a CUDA graph: what ``reduce-overhead`` can reach."""
    x = torch.zeros(1, device=device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        x.add_(1)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            x.add_(1)
    graph.replay()
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize(device)
    return 1e6 * (time.perf_counter() - start) / n


def preflight(mode: Mode, report: Report) -> None:
    """What the machine is. Checked: a CUDA device is visible (on CUDA), and the data is there (the MLP recipe
    builds on it). Measured: Python, torch, the GPU, CUDA/cuDNN/NCCL versions, the matmul ceiling, µs per kernel
    launched eagerly and replayed from a CUDA graph, and what ``amp.dtype=auto`` resolves to."""
    report.measure("python", platform.python_version())
    report.measure("torch", torch.__version__)
    if mode.cuda and not report.check("CUDA device visible", torch.cuda.is_available(), "torch sees no GPU"):
        return
    device = torch.device(mode.device)
    if mode.cuda:
        props = torch.cuda.get_device_properties(device)
        report.measure("gpu", f"{props.name}, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}, "
                              f"{torch.cuda.device_count()} visible")
        report.measure("cuda / cudnn / nccl", f"{torch.version.cuda} / {torch.backends.cudnn.version()} / "
                                              f"{'.'.join(map(str, torch.cuda.nccl.version()))}")
        report.measure("bf16 matmul ceiling, TFLOP/s", round(matmul_ceiling(device, torch.bfloat16) / 1e12, 1))
        report.measure("µs per one-element kernel, eager launch", round(launch_us(device), 2))
        report.measure("µs per one-element kernel, CUDA graph replay", round(graph_kernel_us(device), 2))
    else:
        report.measure("cpu", f"{platform.machine()}, {usable_cores()} usable cores")
        report.measure("fp32 matmul ceiling, GFLOP/s", round(matmul_ceiling(device, torch.float32) / 1e9, 1))
    cfg = mode.config("mlp")
    try:
        built = build(cfg, setup(cfg.dist))
    except DataError as e:
        report.check("data present", False, f"{e} (see the header of benchmarks/gpu_check.sh)")
        return
    info = built.info
    report.check("data present", True, f"{info.name} {built.split.name}: {len(built.split)} images, "
                                       f"{info.shape}; {len(built.data)} batches of {cfg.train.batch_size}")
    amp = built.engine.amp
    report.measure("amp.dtype=auto resolves to", f"{amp.dtype} ({amp.reason})")
