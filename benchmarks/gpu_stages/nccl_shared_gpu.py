"""Stage ``nccl_shared_gpu``: more NCCL ranks than GPUs, refused before any process group is made."""

import re
import time
from pathlib import Path

import torch

from benchmarks.gpu_stages.cli_run import TRAIN, train_args
from benchmarks.gpu_stages.mode import Mode
from benchmarks.gpu_stages.report import Report, run_cmd, tail, torchrun

REFUSAL = "NCCL takes one GPU per rank"
ROOT_CAUSE = re.compile(r"Root Cause.*?exitcode\s*:\s*(-?\d+)", re.DOTALL)  # torchrun's summary of a failed launch


def nccl_shared_gpu(mode: Mode, report: Report) -> None:
    """``torchrun --nproc_per_node=GPUs+1 -m gan_dist.train ... dist.backend=nccl`` (2 ranks on one GPU).
    Checked: the first rank to fail exits 2 (torchrun itself exits 1, its summary naming each rank's status),
    and the refusal is one line per rank (``error (rank R): dist.backend: NCCL takes one GPU per rank, ...``)
    with no traceback through gan_dist. Measured: the seconds until it is refused.
    A hang here (NCCL built on one GPU for two ranks) is this stage's timeout. CUDA only."""
    if not mode.cuda:
        return report.skip("NCCL needs CUDA (on the CPU gan_dist refuses dist.backend=nccl for that alone)")
    ranks = torch.cuda.device_count() + 1
    start = time.perf_counter()
    proc = run_cmd([*torchrun(ranks), *TRAIN, *train_args(mode, "mlp", mode.work / "nccl_shared", "dist.backend=nccl")])
    report.measure("seconds until refused", round(time.perf_counter() - start, 1))
    found = ROOT_CAUSE.search(proc.stdout)
    first = int(found.group(1)) if found else None
    report.check(f"{ranks} ranks: refused, the first failed rank's exit status 2", proc.returncode != 0 and first == 2,
                 f"torchrun exit {proc.returncode}, first failed rank's exit {first}"
                 + ("" if first == 2 else f": {tail(proc.stdout)}"))
    lines = [line for line in proc.stdout.splitlines() if REFUSAL in line]
    traced = [line.strip() for line in proc.stdout.splitlines() if line.strip().startswith('File "') and
              "gan_dist" in Path(line.split('"')[1]).parts]  # a rank's traceback, not torchrun's own
    report.check(f"the refusal: at most one line per rank naming '{REFUSAL}', no traceback",
                 0 < len(lines) <= ranks and not traced, traced[-1] if traced else lines[0] if lines
                 else tail(proc.stdout))
