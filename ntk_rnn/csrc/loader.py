"""Build, cache and load the C kernels of this folder: the one place that runs a compiler.

Each kernel is one ``.c`` file here (``fast.c``: online training of Models D and F,
``features.c``: structured NTK features, ``bptt.c``: truncated BPTT of ElmanRNN and GRURNN) that
includes the shared header ``ntk_rnn.h`` (σ, σ' and Model D's S/P/Q recursion, written once).
`build` compiles a kernel for one input dimension ``d`` and activation with ``-DD=<d>
-DACT=<code>`` (``bptt.c`` takes d at run time), once for float64 and once with ``-DNTK_FLOAT``,
and links both into one shared object whose exported names end in ``_f64`` / ``_f32``. Flags are
tried in order (``_flag_sets``): ``-march=native`` (``$NTK_RNN_MARCH`` overrides it, e.g.
``x86-64-v3`` to build for AVX2 on an AVX-512 machine) with glibc's vector math (libmvec), then
without libmvec, then portable.

**Cache.** Shared objects are cached on disk, named by a hash of the sources, compiler, flags and
CPU: in ``$NTK_RNN_KERNEL_CACHE`` if set, else ``$XDG_CACHE_HOME/ntk_rnn/kernels`` (default
``~/.cache/ntk_rnn/kernels``). The folder is created with mode 0700; a folder (or a cached file)
not owned by this user, or writable by group or others, is refused — another user could plant a
library there — and the kernel is not used. When the folder cannot be created at all (read-only
home), a private folder under the system temp dir is used, with the same checks.

**Binding and fallback.** Each kernel module declares one `Kernel` (its source, the signatures of
its exported functions, its self-check against the torch path). `Kernel.library` builds once per
process and key, runs the self-check, and on any failure (no compiler, build or load error,
refused cache, self-check mismatch) records why and returns None, so that the caller falls back
to eager torch — with one `KernelFallbackWarning` per process and reason. ``NTK_RNN_NO_KERNEL=1``
turns the kernels off (no warning: a choice, not a failure); ``CC`` picks the compiler.

**Loading.** A cached library is opened without following symbolic links (``O_NOFOLLOW``, for
the folder and the file), its owner and mode are checked on the open descriptor, and it is
loaded from that descriptor (``/proc/self/fd/<n>``): a link or a file swapped in after the check
is never what runs; its sha256 must match the one recorded when this package built it
(``<name>.so.sha256``), else it is built again instead of loaded. An unusable
``NTK_RNN_KERNEL_CACHE`` is warned about (once) before the temp-dir fallback
``ntk_rnn_kernels_<uid>`` is used.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Callable

#: σ's code for ``-DACT`` (the activations with a compiled kernel)
ACT_CODES = {"tanh": 0, "sigmoid": 1, "erf": 2}
#: where the ``.c`` / ``.h`` files live (shipped as package data)
SOURCE_DIR = Path(__file__).resolve().parent

_CFLAGS = ("-O3", "-fPIC", "-fno-math-errno", "-fopenmp-simd", "-std=gnu11")
#: the -march of a build when $NTK_RNN_MARCH does not say (x86-64-v3: build for AVX2 on an
#: AVX-512 machine, to check a fast path on the second ISA)
MARCH_NAMES = {"x86-64-v2": "SSE4.2", "x86-64-v3": "AVX2", "x86-64-v4": "AVX-512"}


def march() -> str:
    """GCC's ``-march`` for the kernels: ``$NTK_RNN_MARCH`` or ``native``."""
    m = os.environ.get("NTK_RNN_MARCH", "").strip() or "native"
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", m):
        raise KernelUnavailable(f"NTK_RNN_MARCH={m!r} is not a -march value (e.g. native, "
                                "x86-64-v3)")
    return m


def _flag_sets() -> tuple:
    """(compile flags, link flags), tried in order: -march with libmvec, without, portable."""
    arch = f"-march={march()}"
    return (((arch, "-DUSE_MVEC", "-pthread"), ("-lmvec", "-lm", "-pthread")),
            ((arch, "-pthread"), ("-lm", "-pthread")), (("-pthread",), ("-lm", "-pthread")))


class KernelFallbackWarning(RuntimeWarning):
    """A compiled kernel is not used (see the message for why); the eager torch path runs."""


class KernelUnavailable(RuntimeError):
    """Why a kernel cannot be built or loaded here."""


# --- compiler and sources -----------------------------------------------------------------------
def compiler() -> str | None:
    """The C compiler: ``$CC``, else cc, gcc or clang on PATH; None when there is none."""
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def sources() -> list[Path]:
    """Every kernel file (``*.c``) in this folder."""
    return sorted(SOURCE_DIR.glob("*.c"))


def source(kernel: str) -> Path:
    """The file of ``kernel``: ``<kernel>.c`` in this folder."""
    path = SOURCE_DIR / f"{kernel}.c"
    if not path.is_file():
        raise ValueError(f"unknown kernel {kernel!r}; the kernels are "
                         f"{[p.stem for p in sources()]}")
    return path


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask where the OS has one (a Slurm job or
    ``taskset`` may allow fewer than the machine has), else ``os.cpu_count()``. The cap of every
    team of threads the kernels and the NTK engine start."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def team_size(threads: int, limit: int) -> int:
    """Threads for a team: at most ``threads`` (torch's setting), the usable CPUs and ``limit``
    (the work's own bound), at least 1."""
    return max(1, min(threads, usable_cpus(), limit))


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    ident = platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("model name", "flags", "Features")):
                    ident += line
                    if line.startswith(("flags", "Features")):
                        break
    except OSError:
        pass
    return ident


def _compiler_id(cc: str) -> str:
    real = os.path.realpath(cc)
    try:
        st = os.stat(real)
        return f"{real}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return real


# --- the cache folder ---------------------------------------------------------------------------
def cache_dir() -> Path:
    """The configured kernel cache folder (not yet created or checked)."""
    env = os.environ.get("NTK_RNN_KERNEL_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ntk_rnn" / "kernels"


def _uid() -> int | None:
    return os.getuid() if hasattr(os, "getuid") else None


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def check_private_fd(fd: int, path: Path, what: str = "kernel cache folder") -> os.stat_result:
    """:func:`check_private` on an open descriptor (what is checked is what is used)."""
    st = os.fstat(fd)
    uid = _uid()
    if uid is not None and st.st_uid != uid:
        raise KernelUnavailable(
            f"refused the {what} {path}: it is owned by uid {st.st_uid}, not by this user "
            f"(uid {uid}); remove it or set NTK_RNN_KERNEL_CACHE to a folder of your own")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise KernelUnavailable(
            f"refused the {what} {path}: it is writable by group or others (mode "
            f"{stat.S_IMODE(st.st_mode):#o}); `chmod go-w` it or set NTK_RNN_KERNEL_CACHE")
    return st


def _open_checked(path: Path, what: str, directory: bool, dir_fd: int | None = None) -> int:
    """``path`` opened without following a symbolic link (``O_NOFOLLOW``), its owner, mode and
    type checked on the descriptor. The caller closes it."""
    flags = os.O_RDONLY | _NOFOLLOW | _CLOEXEC | (_DIRECTORY if directory else 0)
    try:
        fd = os.open(path if dir_fd is None else path.name, flags, dir_fd=dir_fd)
    except OSError as exc:
        if os.path.islink(path):
            raise KernelUnavailable(f"refused the {what} {path}: it is a symbolic link "
                                    f"(to {os.readlink(path)}); remove it") from None
        raise exc
    try:
        st = check_private_fd(fd, path, what)
        if directory and not stat.S_ISDIR(st.st_mode) or \
                not directory and not stat.S_ISREG(st.st_mode):
            raise KernelUnavailable(f"refused the {what} {path}: not a "
                                    f"{'folder' if directory else 'regular file'}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_private(path: Path, what: str = "kernel cache folder") -> None:
    """Raise :class:`KernelUnavailable` unless ``path`` is owned by this user and not writable
    by group or others (a library loaded from it runs with this user's rights). A symbolic link
    is refused, not followed."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise KernelUnavailable(f"refused the {what} {path}: it is a symbolic link "
                                f"(to {os.readlink(path)}); remove it")
    os.close(_open_checked(path, what, directory=stat.S_ISDIR(st.st_mode)))


def private_dir(path: Path) -> Path:
    """``path`` created (mode 0700) if missing, then checked with `check_private`.
    OSError when it cannot be created."""
    if not os.path.lexists(path):
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # (ntk_rnn/: 0700 if new)
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            pass
    check_private(path)
    return path


_WARNED_CACHE: set[str] = set()


def _folders() -> list[Path]:
    """The cache folder, or where it cannot be created, a private one in the temp
    dir (named by the uid; root's is ``ntk_rnn_kernels_0``). A configured
    ``NTK_RNN_KERNEL_CACHE`` that cannot be used is warned about once."""
    try:
        return [private_dir(cache_dir())]
    except OSError as exc:  # (a refused folder, KernelUnavailable, is not replaced)
        uid = _uid()
        tmp = Path(tempfile.gettempdir()) / f"ntk_rnn_kernels_{uid if uid is not None else 'user'}"
        env = os.environ.get("NTK_RNN_KERNEL_CACHE")
        if env and env not in _WARNED_CACHE:
            _WARNED_CACHE.add(env)
            warnings.warn(f"ntk_rnn: NTK_RNN_KERNEL_CACHE={env} cannot be used ({exc}); "
                          f"compiled kernels are cached in {tmp} instead",
                          KernelFallbackWarning, stacklevel=3)
        try:
            return [private_dir(tmp)]
        except (OSError, KernelUnavailable) as exc2:
            raise KernelUnavailable(f"no usable kernel cache folder: {cache_dir()}: {exc}; "
                                    f"{tmp}: {exc2}") from None


#: descriptors of loaded kernels, kept open: the library was loaded through
#: /proc/self/fd/<n>, and a reused number would name a different file to the dynamic loader
_LOADED_FDS: list[int] = []


def _read_digest(folder: Path, name: str) -> str | None:
    """The sha256 recorded next to ``folder/name`` when this package built it (None if absent
    or not private)."""
    try:
        fd = _open_checked(folder / (name + ".sha256"), "kernel digest", directory=False)
    except (OSError, KernelUnavailable):
        return None
    with os.fdopen(fd, "rb") as fh:
        text = fh.read(128).decode("ascii", "replace").strip()
    return text if len(text) == 64 else None


def _fd_digest(fd: int) -> str:
    h, offset = hashlib.sha256(), 0
    while True:
        block = os.pread(fd, 1 << 20, offset)
        if not block:
            return h.hexdigest()
        h.update(block)
        offset += len(block)


def load_private(folder: Path, name: str, digest: str | None = "") -> ctypes.CDLL | None:
    """Load ``folder/name``: the folder and the file opened without following links, owner and
    mode checked on the descriptors, and the library loaded from that descriptor
    (``/proc/self/fd``), so what was checked is what runs (no check/load race). With ``digest``
    (not ""), the file's sha256 must equal it, checked on the descriptor before anything is
    loaded: a file this package did not build (None: no record) is not loaded; None is
    returned and the caller builds the kernel again."""
    dfd = _open_checked(folder, "kernel cache folder", directory=True)
    try:
        fd = _open_checked(folder / name, "cached kernel", directory=False, dir_fd=dfd)
    finally:
        os.close(dfd)
    if digest != "" and (digest is None or _fd_digest(fd) != digest):
        os.close(fd)
        return None
    proc = f"/proc/self/fd/{fd}"
    if not os.path.exists(proc):  # no /proc: the checked path (the folder is private)
        os.close(fd)
        lib = ctypes.CDLL(str(folder / name))
    else:
        try:
            lib = ctypes.CDLL(proc)
        except BaseException:
            os.close(fd)
            raise
        _LOADED_FDS.append(fd)
    lib._ntk_path = str(folder / name)  # (status() shows it)
    return lib


# --- build --------------------------------------------------------------------------------------
def _compile(cc: str, src: Path, out: Path, cflags: list[str], lflags: tuple[str, ...],
             workdir: Path) -> str | None:
    """Compile ``src`` for float64 and float32 and link into ``out``; the error text or None."""
    objs = []
    for prec, extra in (("f64", []), ("f32", ["-DNTK_FLOAT"])):
        obj = workdir / f"{prec}.o"
        cmd = [cc, *cflags, *extra, f"-I{SOURCE_DIR}", "-c", str(src), "-o", str(obj)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            return res.stderr.strip()[-400:] or f"{cc} exited with {res.returncode}"
        objs.append(str(obj))
    res = subprocess.run([cc, "-shared", *objs, "-o", str(out), *lflags], capture_output=True,
                         text=True, timeout=300)
    if res.returncode != 0:
        return res.stderr.strip()[-400:] or f"{cc} exited with {res.returncode}"
    return None


def build(kernel: str, d: int, act: str, what: str = "") -> ctypes.CDLL:
    """The shared object of ``kernel`` (a ``.c`` file here) for input dimension ``d`` and
    activation ``act``, from the cache or compiled now. Raises `KernelUnavailable`
    saying why when nothing builds or the cache is refused."""
    what = what or f"the {kernel} kernel"
    if act not in ACT_CODES:
        raise KernelUnavailable(f"activation {act!r} has no compiled kernel")
    cc = compiler()
    if cc is None:
        raise KernelUnavailable("no C compiler (set CC, or install cc/gcc/clang)")
    src = source(kernel)
    text = src.read_text() + "".join(h.read_text() for h in sorted(SOURCE_DIR.glob("*.h")))
    defines = [f"-DD={int(d)}", f"-DACT={ACT_CODES[act]}"]
    errors = []
    for folder in _folders():
        for comp, link in _flag_sets():
            cflags = [*_CFLAGS, *defines, *comp]
            key = hashlib.sha256("\0".join([text, _compiler_id(cc), *cflags, *link, _cpu_id(),
                                            sys.platform]).encode()).hexdigest()[:20]
            path = folder / f"{kernel}_d{int(d)}_{act}_{key}.so"
            try:
                if os.path.lexists(path):  # cached: loaded only if it is the file we built
                    lib = load_private(folder, path.name, _read_digest(folder, path.name))
                    if lib is not None:
                        return lib
                with tempfile.TemporaryDirectory(dir=folder) as tmp:
                    so = Path(tmp) / "k.so"
                    err = _compile(cc, src, so, cflags, link, Path(tmp))
                    if err is not None:
                        errors.append(f"[{' '.join(comp + link)}] {err}")
                        continue  # these flags do not build here: try the next set
                    os.chmod(so, 0o700)
                    digest = hashlib.sha256(so.read_bytes()).hexdigest()
                    side = Path(tmp) / "k.sha256"
                    side.write_text(digest)
                    os.chmod(side, 0o600)
                    os.replace(side, folder / (path.name + ".sha256"))
                    os.replace(so, path)  # atomic: concurrent builders are safe
                lib = load_private(folder, path.name, digest)
                if lib is None:
                    raise KernelUnavailable(f"the kernel just built in {path} changed before it "
                                            "was loaded")
                return lib
            except (OSError, subprocess.SubprocessError) as exc:  # unwritable, or does not load
                errors.append(f"[{' '.join(comp + link)}] in {folder}: {exc}")
    raise KernelUnavailable(f"could not build {what}: " + " | ".join(errors))


# --- load once, self-check, fall back -----------------------------------------------------------
_WARNED: set[str] = set()
_WARN_LOCK = threading.Lock()


def warn_fallback(what: str, reason: str) -> None:
    """One `KernelFallbackWarning` per process and reason."""
    with _WARN_LOCK:
        if reason in _WARNED:
            return
        _WARNED.add(reason)
    warnings.warn(f"ntk_rnn: {what} is not used, the eager torch path runs instead (same "
                  f"results, slower): {reason}", KernelFallbackWarning, stacklevel=3)


class Kernel:
    """One compiled kernel as its Python module declares it, in a few lines:

        KERNEL = loader.Kernel("features", "the compiled NTK features kernel",
                               {"features": ([c_long, ..., c_void_p], c_int)}, _self_check)
        KERNEL.library(d, act)   # the checked CDLL, or None (the reason: KERNEL.reason)
        KERNEL.status(d, act)    # 'ok (<path>)' or 'unavailable: <why>'

    ``source``: the ``.c`` file here; ``signatures``: exported name (without ``_f32`` /
    ``_f64``) → (argtypes, restype), declared on both precisions; ``self_check(lib, d, act)``
    compares the fresh library with the torch path and raises to reject it; ``per_d=False``:
    d is a run-time argument of the kernel (one library per activation, ``d`` ignored).
    `library` builds once per process and (d, act), runs the self-check, and on any failure
    (no kernel for the activation, ``NTK_RNN_NO_KERNEL``, no compiler, a refused cache, a
    mismatch) keeps the reason in ``table`` and warns once (not for the first two: a choice).
    """

    def __init__(self, source: str, what: str,
                 signatures: dict[str, tuple[list[Any], Any]],
                 self_check: Callable[[ctypes.CDLL, int, str], None],
                 per_d: bool = True) -> None:
        self.source, self.what, self.signatures = source, what, signatures
        self.self_check, self.per_d = self_check, per_d
        #: (d, activation) → the checked CDLL, or the reason it is not used
        self.table: dict[tuple[int, str], Any] = {}
        self._lock = threading.RLock()

    def _key(self, d: int | None, act: str) -> tuple[int, str]:
        return (int(d if d is not None else 4) if self.per_d else 0), act

    def build(self, d: int | None, act: str) -> ctypes.CDLL:
        """The library built (or loaded from the cache) and declared, not self-checked: the one
        in ``table`` while its self-check runs (the check reaches it through here)."""
        key = self._key(d, act)
        lib = self.table.get(key)
        if isinstance(lib, ctypes.CDLL):
            return lib
        lib = build(self.source, key[0] if self.per_d else 1, act, self.what)
        for name, (argtypes, restype) in self.signatures.items():
            for sfx in ("f32", "f64"):
                fn = getattr(lib, f"{name}_{sfx}")
                fn.argtypes, fn.restype = list(argtypes), restype
        return lib

    def library(self, d: int | None = None, act: str = "tanh") -> ctypes.CDLL | None:
        """The compiled, self-checked library for input dimension ``d`` and activation ``act``,
        or None (the reason: `reason`)."""
        key = self._key(d, act)
        with self._lock:
            if key not in self.table:
                if act not in ACT_CODES:
                    self.table[key] = f"activation {act!r} has no compiled kernel"
                elif os.environ.get("NTK_RNN_NO_KERNEL"):
                    self.table[key] = "disabled by NTK_RNN_NO_KERNEL"
                else:
                    try:
                        self.table[key] = self.build(*key)
                        self.self_check(self.table[key], *key)
                    except Exception as exc:  # noqa: BLE001 - any failure means: the fallback
                        reason = str(exc) if isinstance(exc, KernelUnavailable) else \
                            f"{type(exc).__name__}: {exc}"
                        self.table[key] = reason
                        warn_fallback(self.what, reason)
            lib = self.table[key]
        return lib if isinstance(lib, ctypes.CDLL) else None

    def reason(self, d: int | None = None, act: str = "tanh") -> str:
        """Why `library` gives None for (d, act) ('' when it gives a library)."""
        lib = self.library(d, act)
        return "" if lib is not None else str(self.table[self._key(d, act)])

    def status(self, d: int | None = None, act: str = "tanh") -> str:
        """'ok (<path of the shared object>)' or 'unavailable: <why>' (d defaults to 4)."""
        lib = self.library(d, act)
        if lib is not None:
            return f"ok ({getattr(lib, '_ntk_path', getattr(lib, '_name', ''))})"
        return f"unavailable: {self.reason(d, act)}"
