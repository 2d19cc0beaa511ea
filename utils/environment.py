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


def set_tf32(enabled: bool) -> str:
    """Allow (or forbid) TF32 in CUDA float32 matmuls and cuDNN convolutions, overriding any earlier
    global setting; "highest" float32 matmul precision when off. Returns a line for the log."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    if enabled:
        return "TF32: on for float32 matmuls and convolutions on CUDA (Ampere and newer; --no-tf32 for full fp32)"
    return "TF32: off, float32 matmuls and convolutions in full fp32 (--tf32 to allow TF32 on CUDA)"
