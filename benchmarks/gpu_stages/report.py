"""What a stage records, and the evidence its checks quote from the commands it runs."""

import json
import os
import subprocess
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.gpu_stages.mode import PY, REPO


class Report:
    """What one stage found. Checks decide the exit status; measurements and targets are reported."""

    def __init__(self, stage: str, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"stage": stage, "checks": [], "measured": {}, "targets": [], "notes": [],
                                     "skipped": None}

    @property
    def passed(self) -> bool:
        return all(c["ok"] for c in self.data["checks"])

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.data["checks"].append({"name": name, "ok": bool(ok), "detail": detail})
        print(f"  [{'ok' if ok else 'FAIL'}] {name}" + (f": {detail}" if detail else ""), flush=True)
        self._save()
        return bool(ok)

    def measure(self, name: str, value: Any) -> None:
        self.data["measured"][name] = value
        print(f"  - {name}: {value}", flush=True)
        self._save()

    def target(self, name: str, value: float, bar: float) -> None:
        met = value >= bar
        self.data["targets"].append({"name": name, "value": value, "bar": bar, "met": met})
        print(f"  target {name} = {value:.2f} (bar >= {bar}): {'met' if met else 'NOT met'}", flush=True)
        self._save()

    def skip(self, reason: str) -> None:
        """The stage cannot run here (a CUDA-only stage in the CPU mode): reported as skipped, with ``reason``."""
        self.data["skipped"] = reason
        print(f"  skipped: {reason}", flush=True)
        self._save()

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        print(f"  note: {text}", flush=True)
        self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1, default=str) + "\n")


def tail(text: str, chars: int = 2000) -> str:
    return text[-chars:].strip()


def line_with(text: str, needle: str) -> str:
    """The first line of ``text`` that holds ``needle``, else its tail: the evidence a check quotes."""
    return next((line for line in text.splitlines() if needle in line), tail(text))


def outcome(proc: subprocess.CompletedProcess, ok: bool, needle: str) -> str:
    """A check's evidence: the line naming the success (none without a needle), or the exit status and the
    tail of the output."""
    if not ok:
        return f"exit {proc.returncode}: {tail(proc.stdout)}"
    return line_with(proc.stdout, needle) if needle else ""


def raised(e: BaseException) -> str:
    """The exception and the innermost frame of gan_dist (or of the benchmarks) that it passed through."""
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if Path(f.filename).parent.name in ("gan_dist", "benchmarks", "gpu_stages")]
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{where}"


def guarded(report: Report, name: str, fn: Callable[..., Any], *args: Any) -> None:
    """``fn(*args)``; an exception becomes the failed check ``name`` and the next case goes on."""
    try:
        fn(*args)
    except Exception as e:
        traceback.print_exc()
        report.check(name, False, raised(e))


def run_cmd(cmd: Sequence[str | Path], env: dict[str, str] | None = None,
            timeout_s: float | None = None) -> subprocess.CompletedProcess:
    """A command in the repository root, its stderr merged into its stdout, ``env`` added to this process's
    environment. The stage's timeout bounds it; ``timeout_s`` (for one process, not torchrun's ranks) kills it
    sooner, and it then exits 124 with the output it had written, so the stage can still report from it."""
    try:
        return subprocess.run([str(c) for c in cmd], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=os.environ | env if env else None, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        out = e.output.decode(errors="replace") if isinstance(e.output, bytes) else e.output or ""
        return subprocess.CompletedProcess(e.cmd, 124, f"{out}\n(killed after {timeout_s:g} s)")


def torchrun(nproc: int) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
