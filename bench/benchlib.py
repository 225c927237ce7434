"""Helpers shared by the benchmark scripts: machine record, tables, JSON output and peak-memory probes.

Every benchmark JSON carries `machine_info()` (date, host, CPU, load average at start and end, torch threads,
device, git commit), so a figure can always be judged against how busy the machine was when it was taken.
Peak memory on CPU is the process's peak resident set size, reset between measurements through
``/proc/self/clear_refs`` (Linux); on CUDA it is the caching allocator's peak.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import socket
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from engine.crystal.prompts import build_prompts
from engine.crystal.tokenizer import encode
from engine.lab.fsutil import atomic_write_json
from engine.lab.runs import git_sha
from engine.lab.settings import get_settings
from engine.models.checkpoint import load_model
from engine.models.gpt import GPT, PRESETS


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or what `platform` knows elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (runnable processes), or None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """What a figure depends on: date, host, CPU, load, torch threads, accelerator name, commit."""
    import torch

    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_start": load_average(),
        "device": device,
        "device_name": None,
        "git_commit": git_sha(),
        "argv": sys.argv[1:],
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
    return info


def finish(info: dict[str, Any]) -> dict[str, Any]:
    """Add the end-of-run load average to a `machine_info` dict (returned for chaining)."""
    info["load_avg_end"] = load_average()
    return info


def default_out(name: str) -> Path:
    """Default JSON path of a benchmark: ``<runs>/bench/<name>.json``."""
    return get_settings().runs_dir / "bench" / f"{name}.json"


def write_result(path: Path, result: dict[str, Any]) -> Path:
    """Write the result JSON atomically and say where."""
    atomic_write_json(path, result)
    print(f"wrote {path}")
    return path


def int_list(text: str) -> list[int]:
    """Parse ``"1,2,4"`` into ``[1, 2, 4]`` (for argparse ``type=``)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"expected positive integers, got {text!r}")
    return values


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: numbers to ``digits`` significant digits, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e6:
            return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"
        return f"{value:.2e}"
    return str(value)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str | None = None) -> None:
    """Print ``rows`` as an aligned plain-text table with the given column keys."""
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    if title:
        print(f"\n{title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


# --- memory --------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def rss_bytes() -> int | None:
    """Current resident set size of this process in bytes (Linux), else None."""
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else None


class PeakMemory:
    """Peak memory of a block of work, in bytes above the level when the block started.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors only). CPU: peak resident set size, reset by writing 5 to
    ``/proc/self/clear_refs`` (Linux >= 4.0); ``peak_bytes`` is None where that is not possible.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak_bytes: int | None = None

    def __enter__(self) -> PeakMemory:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        self._base = rss_bytes()
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self._base = None
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._base
            return
        hwm = _status_kib("VmHWM")
        if self._base is not None and hwm is not None:
            self.peak_bytes = max(0, hwm * 1024 - self._base)


def available_memory_bytes() -> int | None:
    """Memory the kernel says is available for new allocations (MemAvailable), or None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


class Timer:
    """Wall-clock seconds of a block; synchronises CUDA first and last so queued kernels are counted."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.seconds = 0.0

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    def __enter__(self) -> Timer:
        self._sync()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sync()
        self.seconds = time.perf_counter() - self._t0


def build_model(arch: str, ckpt: str | None, device: torch.device, seed: int = 1337) -> tuple[GPT, str]:
    """A model in eval mode on ``device``: ``ckpt`` loaded, else preset ``arch`` with seeded random weights.

    Returns:
        ``(model, label)`` where the label names the shape and parameter count.
    """
    if ckpt:
        model, _ = load_model(ckpt, device)
        label = Path(ckpt).name
    else:
        if arch not in PRESETS:
            raise SystemExit(f"unknown --arch {arch!r}: choose from {', '.join(PRESETS)}")
        torch.manual_seed(seed)
        model = GPT(PRESETS[arch]).to(device)
        label = arch
    cfg = model.config
    total = model.num_params(non_embedding=False)
    label += f" ({cfg.n_layer}L/{cfg.n_head}H/{cfg.n_embd}, {total / 1e6:.1f} M)"
    return model.eval(), label


def prompt_ids_for(formula: str | None) -> list[int]:
    """Token ids of the CrystaLLM prompt for a cell composition (``data_Na2Cl2\\n``; None: ``data_``)."""
    return encode(build_prompts(formula)[0].text)
