"""Memory a run will need, estimated from its config before anything is allocated.

The estimate is deliberately simple (an upper-ish bound of the big arrays): per network the
parameters and the online gradient state (a few copies, from ``model.width`` N and the input
dimension d: N(d+2) for Models D/F, plus N² per recurrent matrix of Elman (1) and GRU (3)), the
truncated-BPTT window, the running-MSE ring (``train.mse_window``), and the NTK callback's probe
features and kernels (``callbacks.ntk.n_probes`` P: P x parameters and P² entries, and the
probes' P x L x N activations); times ``train.ensemble_size``. A run whose estimate exceeds the
memory available now (``MemAvailable``; the GPU's free memory for ``device=cuda``) is refused
with a :class:`~ntk_rnn.errors.ConfigError` naming the estimate, the key that dominates it and
what is available. ``NTK_RNN_NO_MEMORY_CHECK=1`` turns the check off.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from ..errors import ConfigError
from .config import opt

ITEM = {"float32": 4, "float64": 8}
COPIES = 8  # parameters, online state, snapshot, stepper buffers, checkpoint copies


def available_bytes(device: str = "cpu") -> Optional[int]:
    """Memory available now: MemAvailable (Linux), the GPU's free memory for cuda; None when
    unknown."""
    if str(device).startswith("cuda"):
        try:
            import torch

            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        except Exception:  # noqa: BLE001
            return None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def estimate(cfg: Any, input_dim: int) -> tuple[int, dict[str, int]]:
    """(bytes, {key: bytes}) of the run's big arrays; the keys name what drives each part."""
    m, t = cfg.model, cfg.train
    width = opt(m, "width")
    if not isinstance(width, int) or isinstance(width, bool):
        return 0, {}
    N, d = int(width), max(1, int(input_dim))
    item = ITEM.get(str(opt(cfg, "dtype", "float32")), 8)
    target = str(opt(m, "_target_", ""))
    square = 3 if target.endswith("GRURNN") else 1 if target.endswith("ElmanRNN") else 0
    if square == 0 and "MeanFieldRNN" not in target:
        square = 1  # another model: assume one N x N matrix
    params = N * (d + 2) + square * (N * N + N * (d + 1))
    parts = {"model.width": COPIES * params * item}
    gradient = str(opt(t, "gradient", "auto"))
    if gradient == "bptt" or (gradient == "auto" and "MeanFieldRNN" not in target):
        parts["train.bptt_window"] = 4 * int(opt(t, "bptt_window", 32)) * N * (d + 2 + 3 * square) \
            * item
    window = int(opt(t, "mse_window", 0) or 0) or N
    try:
        from .config import num_steps

        window = min(window, num_steps(cfg))
    except Exception:  # noqa: BLE001 - validate() reports a bad horizon
        pass
    parts["train.mse_window"] = 8 * window
    ntk = (opt(cfg, "callbacks") or {}).get("ntk") if hasattr(opt(cfg, "callbacks"), "get") \
        else None
    if ntk is not None and hasattr(ntk, "get"):
        P = ntk.get("n_probes", 64)
        L = ntk.get("probe_length", 24)
        if isinstance(P, int) and isinstance(L, int) and P > 0 and L > 0:
            parts["callbacks.ntk.n_probes"] = 8 * (3 * P * params + 6 * P * P + 2 * P * L * N)
    E = int(opt(t, "ensemble_size", 1) or 1)
    if E > 1:
        parts = {k: E * v for k, v in parts.items()}
    return sum(parts.values()), parts


def _gb(n: float) -> str:
    return f"{n / 2**30:.3g} GiB" if n >= 2**30 else f"{n / 2**20:.3g} MiB"


def check_resources(cfg: Any, input_dim: int) -> None:
    """Refuse a run whose estimated memory exceeds what is available (see the module doc)."""
    if os.environ.get("NTK_RNN_NO_MEMORY_CHECK") == "1":
        return
    need, parts = estimate(cfg, input_dim)
    if not parts:
        return
    have = available_bytes(str(opt(cfg, "device", "cpu")))
    if have is None or need <= have:
        return
    key = max(parts, key=parts.get)
    value = {"model.width": opt(cfg.model, "width"),
             "train.mse_window": opt(cfg.train, "mse_window"),
             "train.bptt_window": opt(cfg.train, "bptt_window")}.get(key)
    lower = key
    if key == "callbacks.ntk.n_probes":
        value = f"{cfg.callbacks.ntk.get('n_probes')} at model.width={opt(cfg.model, 'width')}"
        lower = "model.width or callbacks.ntk.n_probes (or callbacks=none)"
    E = int(opt(cfg.train, "ensemble_size", 1) or 1)
    ens = f" for train.ensemble_size={E} networks" if E > 1 else ""
    raise ConfigError(f"the run needs about {_gb(need)} of memory{ens}, mostly for {key}={value} "
                      f"({_gb(parts[key])}), but {_gb(have)} are available; lower {lower}"
                      f"{' or train.ensemble_size' if E > 1 else ''} "
                      "(NTK_RNN_NO_MEMORY_CHECK=1 skips this check)")
