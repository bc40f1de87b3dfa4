"""How a model runs, apart from what it computes: device checks, CPU features, seeding, inputs.

Example:
    >>> check_device("cpu").type
    'cpu'
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from patchknn.errors import ConfigError

__all__ = [
    "check_device",
    "check_run_options",
    "native_bf16",
    "progress_bar",
    "resolve_precision",
    "seed_everything",
]


def check_device(device: str) -> torch.device:
    """``device`` as a :class:`torch.device`, or :class:`ConfigError` saying what is allowed."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but no CUDA device is available; use device='cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    return dev


def native_bf16() -> bool:
    """Whether this CPU runs bfloat16 convolutions natively (AVX512-BF16 or AMX).

    oneDNN reports bfloat16 as "supported" on any AVX-512 CPU, emulating it where the instructions
    are missing (about 2x *slower* than float32 there), so on Linux the CPU's own flags decide.
    """
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
        if flags:
            return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))
    except OSError:
        pass
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` -> ``"bfloat16"`` on a GPU or a CPU with native bfloat16, else ``"float32"``;
    other values as given."""
    if precision != "auto":
        return precision
    return "bfloat16" if device.type == "cuda" or native_bf16() else "float32"


def check_run_options(*, batch_size: object, num_workers: object, on_error: object, max_pixels: object) -> None:
    """The estimator's run options (see :class:`~patchknn.model.PatchKNN`), or :class:`ConfigError`
    saying what is allowed."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if num_workers != "auto" and (
        isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0
    ):
        raise ConfigError(f"num_workers must be an integer >= 0 or 'auto', got {num_workers!r}")
    if on_error not in ("stop", "skip"):
        raise ConfigError(f"on_error must be 'stop' or 'skip', got {on_error!r}")
    if max_pixels is not None and (
        isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1
    ):
        raise ConfigError(f"max_pixels must be a positive integer or None (no limit), got {max_pixels!r}")


def progress_bar(total: int, desc: str, enabled: bool = True, unit: str = "img") -> Any:
    """A tqdm progress bar, shown only when ``enabled`` and stderr is a terminal (one rule for
    fit, predict, calibration and the report)."""
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled or not sys.stderr.isatty(), leave=False)


def seed_everything(seed: int) -> None:
    """Seed torch and numpy's global generator (the fit's random steps draw from seeded generators
    of their own as well)."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
