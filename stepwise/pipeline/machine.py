"""The facts that make CPU (and GPU) runs of one recipe differ across machines, written into each report.

The same recipe and seed give bitwise-identical results on one machine, but not across machines: the
BLAS library and its build choose different kernels and summation orders, the CPU's vector width picks
other code paths, and the thread count splits reductions differently. `machine_facts` records them
(for the machine writing the report: the driver's, which on a local run is where every stage ran) so
two reports can be compared knowing whether those differ.
"""
from __future__ import annotations

import os
import platform
import re
from pathlib import Path

from stepwise.pipeline.launch import worker_threads


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _build_setting(config: str, name: str) -> str | None:
    found = re.search(rf"\b{name}=([^,\s]+)", config)
    return found.group(1) if found else None


def machine_facts(nproc_per_node: int) -> dict[str, object]:
    """torch build (version, BLAS/LAPACK, CPU capability), CPU model and cores, the threads each worker
    process uses, and the GPUs when CUDA is present."""
    import torch

    config = torch.__config__.show()
    capability = re.search(r"CPU capability usage: (\S+)", config)
    facts: dict[str, object] = {
        "torch": torch.__version__,
        "blas": _build_setting(config, "BLAS_INFO"),
        "lapack": _build_setting(config, "LAPACK_INFO"),
        "cpu_capability": capability.group(1) if capability else None,
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "worker_threads": worker_threads(nproc_per_node),
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        facts["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        facts["cuda"] = torch.version.cuda
    return facts


def machine_lines(facts: dict[str, object]) -> list[str]:
    """The report's markdown section for `facts`."""
    lines = ["## Machine", "", "Results of the same recipe and seed differ across machines when these differ "
             "(kernels and summation orders of the BLAS build, vector width, threads per process).", ""]
    lines += [f"- {name}: {value}" for name, value in facts.items()]
    return lines + [""]
