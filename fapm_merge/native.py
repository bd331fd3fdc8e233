"""The fused FAPM pass in C (``fused.c``): built on first use, loaded with ctypes.

The torch path makes about twenty float32 passes per slice; on CPUs where those passes cost
more than the disk (docs/benchmarks.md), one C loop per element is what keeps ``fapm`` at
task_arithmetic's speed. The C code repeats the torch path's float32 operations one by one,
so results are bit-identical; without a compiler, or with ``FAPM_MERGE_NATIVE=0``, the torch
path runs instead (same results, slower).

The library is compiled once per source version and compiler into the user's cache
(``$FAPM_MERGE_CACHE``, else ``$XDG_CACHE_HOME/fapm-merge``, else ``~/.cache/fapm-merge``),
written under a temporary name and renamed, so concurrent processes never load half a file.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Tuple

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("fused.c")
# Each float32 operation rounded on its own, as torch does it: no contraction to fused
# multiply-add, no fast-math reordering.
FLAGS = ["-O3", "-std=c99", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared"]
DTYPES = {torch.bfloat16: 0, torch.float32: 1}
SLICE = 1 << 20  # elements per call: the unit of work of one thread


def cache_dir() -> Path:
    explicit = os.environ.get("FAPM_MERGE_CACHE")
    if explicit:
        return Path(explicit)
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "fapm-merge"


def _compiler() -> Optional[List[str]]:
    """The C compiler's command: ``$CC`` (which may carry words: ``ccache gcc``), else cc."""
    named = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    return shlex.split(named) if named else None


def _build(compiler: List[str]) -> Path:
    """The compiled library's path, compiling it if this source and compiler have none."""
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), version, platform.machine(), *FLAGS]).encode()
    ).hexdigest()[:16]
    target = cache_dir() / "native" / f"fused-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=target.parent, suffix=".so.partial")
    os.close(handle)
    try:
        done = subprocess.run([*compiler, *FLAGS, str(SOURCE), "-o", partial],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip()[-2000:]
                               or f"{shlex.join(compiler)} exited {done.returncode}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


@functools.lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """The loaded library, or None (disabled, no compiler, or the build failed: logged once)."""
    if os.environ.get("FAPM_MERGE_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    compiler = _compiler()
    if compiler is None:
        log.warning("fapm-merge: no C compiler (cc) found, so FAPM runs its torch path: same "
                    "results, slower on CPU. Install gcc, or set FAPM_MERGE_NATIVE=0 to hide "
                    "this.")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        log.warning("fapm-merge: building the fused FAPM pass with %s failed (%s); FAPM runs "
                    "its torch path: same results, slower on CPU. FAPM_MERGE_NATIVE=0 hides "
                    "this.", shlex.join(compiler), error)
        return None
    f = lib.fapm_fused_slice
    f.restype = ctypes.c_int64
    f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64,
                  ctypes.c_float, ctypes.c_float, ctypes.c_float, ctypes.c_void_p,
                  ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                  ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int32)]
    return lib


def takes(dtype: torch.dtype) -> bool:
    """Whether the fused C pass is built and takes CPU tensors of this dtype."""
    return dtype in DTYPES and library() is not None


def applies(base: torch.Tensor, finetuned: torch.Tensor) -> bool:
    """Whether the fused C pass takes this pair: CPU, contiguous, both bfloat16 or float32."""
    return (
        base.device.type == "cpu"
        and finetuned.device == base.device
        and base.dtype == finetuned.dtype
        and base.is_contiguous()
        and finetuned.is_contiguous()
        and takes(base.dtype)
    )


def fapm_scan(
    base: torch.Tensor,
    finetuned: torch.Tensor,
    mean: float,
    lo: float,
    hi: float,
    out: Optional[torch.Tensor] = None,
    keep: Optional[torch.Tensor] = None,
    threads: Optional[int] = None,
) -> Tuple[int, torch.Tensor, torch.Tensor, bool]:
    """The fused pass over flat, contiguous ``base`` / ``finetuned`` (see :func:`applies`).

    Writes ``where(score > hi, W_ft, W_pre)`` into ``out`` (flat, same dtype), or
    ``score > hi`` into the bool ``keep``. Returns (count above ``hi``, candidate scores with
    ``lo <= score <= hi``, their flat indices ascending, whether every ``|dW|`` was finite).
    Scores are the *raw* FAPM scores of ``kernel._FapmScorer.of(exact=False)``, bit for bit;
    ``mean`` must be non-zero. Runs on ``threads`` threads (default torch's thread count, the
    user's ``--num-threads``), one slice of :data:`SLICE` elements per call.
    """
    lib = library()
    n = base.numel()
    dtype = DTYPES[base.dtype]
    size = base.element_size()
    neg_mean = ctypes.c_float(-mean)  # torch multiplies by the scalar rounded to float32
    lo_f, hi_f = ctypes.c_float(lo), ctypes.c_float(hi)
    local = threading.local()  # each thread's candidate buffers, reused slice after slice

    def one_slice(start: int) -> tuple:
        m = min(SLICE, n - start)
        if not hasattr(local, "values"):
            local.values = torch.empty(min(SLICE, n), dtype=torch.float32)
            local.indices = torch.empty(min(SLICE, n), dtype=torch.int64)
        above, finite = ctypes.c_int64(), ctypes.c_int32()
        count = lib.fapm_fused_slice(
            base.data_ptr() + start * size, finetuned.data_ptr() + start * size, dtype, m,
            neg_mean, lo_f, hi_f,
            None if out is None else out.data_ptr() + start * size,
            None if keep is None else keep.data_ptr() + start,
            local.values.data_ptr(), local.indices.data_ptr(), start,
            ctypes.byref(above), ctypes.byref(finite))
        return (above.value, local.values[:count].clone(), local.indices[:count].clone(),
                bool(finite.value))

    starts = range(0, n, SLICE)
    # Slices are handed out one at a time, so a thread slowed by another job on its core
    # delays only the slices it holds (torch's intra-op threads wait for the slowest).
    workers = min(max(1, threads or torch.get_num_threads()), len(starts))
    if workers == 1:
        parts = [one_slice(start) for start in starts]
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="fapm") as pool:
            parts = list(pool.map(one_slice, starts))  # in slice order
    above = sum(part[0] for part in parts)
    values = torch.cat([part[1] for part in parts])
    indices = torch.cat([part[2] for part in parts])
    return above, values, indices, all(part[3] for part in parts)
