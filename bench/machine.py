"""What the benchmark ran on: CPU, cores, RAM, GPU, library versions, date and command line."""
from __future__ import annotations

import os
import platform
import shlex
import sys
from datetime import datetime


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (the platform's processor string elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_info(argv: list[str]) -> dict:
    """A JSON-able description of this machine and run."""
    import numpy as np
    import psutil
    import torch

    import kmfeat

    try:
        import faiss
        faiss_version = faiss.__version__
    except ImportError:
        faiss_version = None
    return {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "versions": {"kmfeat": kmfeat.__version__, "python": platform.python_version(), "torch": torch.__version__,
                     "numpy": np.__version__, "faiss": faiss_version},
        "date": datetime.now().astimezone().isoformat(timespec="minutes"),
        "command": "python -m bench " + shlex.join(argv) if argv else "python -m bench",
        "executable": sys.executable,
    }


def markdown_header(info: dict, title: str) -> str:
    """The lines above a Markdown table: machine, versions, date and the exact command."""
    v = info["versions"]
    versions = ", ".join(f"{name} {v[name]}" for name in ("kmfeat", "python", "torch", "numpy", "faiss") if v[name])
    return "\n".join([
        f"### {title}",
        "",
        f"- Machine: {info['cpu']}, {info['cores']} cores, {info['ram_gb']:g} GiB RAM, "
        f"GPU: {info['gpu'] or 'none'} (torch {info['torch_threads']} threads)",
        f"- Versions: {versions}",
        f"- Date: {info['date']}",
        f"- Command: `{info['command']}`",
        "",
    ])
