"""One line naming the machine a number was measured on (CPU, cores, torch/timm/Python versions)."""
import os
import platform

import torch


def environment_line() -> str:
    """CPU model and vector extensions, cores, torch and timm versions: what the demo's numbers depend on."""
    import timm

    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    cpu = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return (f"{cpu} ({vector}), {os.cpu_count()} cores, torch {torch.__version__}, timm {timm.__version__}, "
            f"Python {platform.python_version()}")
