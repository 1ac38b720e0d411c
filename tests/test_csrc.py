"""The C kernels (ntk_rnn/csrc): every file compiles, the kernels build and pass their self-check
wherever a C compiler is on PATH (no silent fallback), the per-user kernel cache refuses folders
that others could write to, and every fallback warns once and stays exact."""

from __future__ import annotations

import configparser
import fnmatch
import os
import stat
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

from ntk_rnn import MeanFieldRNN, OnlineState, rtrl_step
from ntk_rnn.csrc import loader
from ntk_rnn.ntk import _features_c, empirical_ntk
from ntk_rnn.online import fast
from ntk_rnn.online.ensemble import EnsembleStepper

CC = loader.compiler()
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler on PATH")
ROOT = Path(__file__).resolve().parent.parent
F64 = torch.float64


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """Empty kernel tables and warning memory, a private cache folder under tmp_path."""
    monkeypatch.setattr(fast.KERNEL, "table", {})
    monkeypatch.setattr(_features_c.KERNEL, "table", {})
    monkeypatch.setattr(loader, "_WARNED", set())
    monkeypatch.delenv("NTK_RNN_NO_KERNEL", raising=False)
    monkeypatch.delenv("NTK_RNN_FAST_BACKEND", raising=False)
    cache = tmp_path / "kernels"
    monkeypatch.setenv("NTK_RNN_KERNEL_CACHE", str(cache))
    return cache


def test_no_c_source_hides_in_python():
    """C lives in csrc/*.c only: no module of the package builds it from a Python string."""
    pkg = loader.SOURCE_DIR.parent
    for py in pkg.rglob("*.py"):
        text = py.read_text()
        assert "#include <" not in text and "string import Template" not in text, py


def test_sources_are_files_with_one_header():
    names = sorted(p.name for p in loader.SOURCE_DIR.iterdir() if p.suffix in (".c", ".h"))
    assert names == ["bptt.c", "fast.c", "features.c", "ntk_rnn.h"]
    for src in loader.sources():
        text = src.read_text()
        assert '#include "ntk_rnn.h"' in text
        assert "$" not in text  # no templating layer left
        assert "INL void act_eval" not in text and "INL void spq_step" not in text  # header's
    header = (loader.SOURCE_DIR / "ntk_rnn.h").read_text()
    assert "INL void spq_step(" in header and "INL void act_eval(" in header


@needs_cc
@pytest.mark.parametrize("src", [p.name for p in loader.sources()])
def test_every_c_file_compiles(src):
    """`cc -fsyntax-only -Wall -Werror` for both precisions, every activation, with and without
    the libmvec declarations."""
    for act in (0, 1, 2):
        for extra in ([], ["-DNTK_FLOAT"], ["-DUSE_MVEC"], ["-DNTK_FLOAT", "-DUSE_MVEC"]):
            cmd = [CC, "-fsyntax-only", "-std=gnu11", "-Wall", "-Wextra", "-Werror",
                   "-fopenmp-simd", "-DD=3", f"-DACT={act}", *extra,
                   str(loader.SOURCE_DIR / src)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            assert res.returncode == 0, (cmd, res.stderr)


@needs_cc
def test_kernels_build_and_pass_self_check_when_a_compiler_is_present(fresh):
    """A fresh build (empty cache) of both kernels, then their self-checks: with a compiler on
    PATH a failure here is a bug, never a silent fallback to eager."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", loader.KernelFallbackWarning)
        for act in ("tanh", "sigmoid", "erf"):
            assert fast.KERNEL.status(3, act).startswith("ok"), fast.KERNEL.status(3, act)
            status = _features_c.KERNEL.status(3, act)
            assert status.startswith("ok"), status
    built = sorted(p.name for p in fresh.iterdir() if p.suffix == ".so")
    assert len(built) == 6, built
    assert sorted(p.name for p in fresh.iterdir()) == sorted(built + [b + ".sha256" for b in built])
    assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o700
    m = MeanFieldRNN(3, 16, seed=0, dtype=F64)
    st = fast.FastStepper(m, 0.1)
    assert st.backend == "kernel" and st.backend_reason.startswith("auto: ok (")


def test_shipped_as_package_data():
    """setup.cfg's [options.package_data] covers every file of ntk_rnn/csrc the loader reads."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg.has_section("options.package_data"), "setup.cfg has no [options.package_data]"
    patterns = []
    for key, value in cfg.items("options.package_data"):
        pkg = "" if key in ("*", "") else key.replace(".", "/") + "/"
        patterns += [pkg + v.strip() for v in value.replace(",", "\n").split() if v.strip()]
    for path in loader.SOURCE_DIR.iterdir():
        if path.suffix in (".c", ".h"):
            rel = path.relative_to(ROOT).as_posix()
            assert any(fnmatch.fnmatch(rel, "ntk_rnn/" + p if not p.startswith("ntk_rnn/")
                                       else p) for p in patterns), (rel, patterns)


# --- the cache folder ---------------------------------------------------------------------------
def _reference(m, X, Y, lr):
    st = OnlineState.zeros(m)
    return torch.stack([rtrl_step(m, st, X[k], Y[k], lr) for k in range(X.shape[0])])


def _falls_back_exactly(match: str) -> None:
    """A fresh FastStepper falls back to eager with one warning matching ``match``, and trains
    exactly as the reference; a second stepper does not warn again."""
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(200, 3, generator=g, dtype=F64), torch.randn(200, generator=g, dtype=F64)
    m, m_ref = MeanFieldRNN(3, 24, seed=1, dtype=F64), MeanFieldRNN(3, 24, seed=1, dtype=F64)
    lr = m.learning_rate(2.0)
    with pytest.warns(loader.KernelFallbackWarning, match=match):
        st = fast.FastStepper(m, lr)
    assert st.backend == "eager" and "unavailable" in st.backend_reason, st.backend_reason
    out = st.run_chunk(X, Y)
    ref = _reference(m_ref, X, Y, lr)
    assert float((out - ref).abs().max()) < 1e-12
    assert float((m.w - m_ref.w).detach().abs().max()) < 1e-12
    with warnings.catch_warnings():
        warnings.simplefilter("error", loader.KernelFallbackWarning)  # once per reason
        assert fast.FastStepper(MeanFieldRNN(3, 24, seed=2, dtype=F64), lr).backend == "eager"
        ens = EnsembleStepper([MeanFieldRNN(3, 24, seed=s, dtype=F64) for s in (0, 1)], lr=lr)
        assert ens.backend == "eager" and "unavailable" in ens.backend_reason


def test_cache_folder_is_created_private(fresh):
    assert loader.private_dir(fresh) == fresh
    assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o700


def test_world_writable_cache_folder_is_refused(fresh):
    fresh.mkdir()
    os.chmod(fresh, 0o777)
    _falls_back_exactly("writable by group or others")
    assert "refused" in fast.KERNEL.status(3) and list(fresh.iterdir()) == []
    assert _features_c.KERNEL.library(3, "tanh") is None  # no warning again: same reason


def test_cache_folder_of_another_user_is_refused(fresh, monkeypatch):
    fresh.mkdir(mode=0o700)
    real = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: real + 1)
    _falls_back_exactly(f"owned by uid {real}")
    assert list(fresh.iterdir()) == []


def test_cached_library_of_another_user_is_refused(fresh, monkeypatch):
    """The folder is fine but a cached shared object is not ours: not loaded."""
    fresh.mkdir(mode=0o700)
    real_fstat = os.fstat  # (the loader checks the descriptor it loads from)

    def fake_fstat(fd, *a, **k):
        st = real_fstat(fd, *a, **k)
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".so"):
            return os.stat_result((st.st_mode, st.st_ino, st.st_dev, st.st_nlink,
                                   st.st_uid + 1) + tuple(st)[5:])
        return st

    monkeypatch.setattr(os, "fstat", fake_fstat)
    if CC is None:
        pytest.skip("no C compiler: nothing is built to refuse")
    _falls_back_exactly("refused the cached kernel")


def test_no_compiler_warns_once_and_stays_exact(fresh, monkeypatch):
    monkeypatch.setattr(loader, "compiler", lambda: None)
    _falls_back_exactly("no C compiler")
    assert fast.KERNEL.status(3) == "unavailable: no C compiler (set CC, or install cc/gcc/clang)"
    m = MeanFieldRNN(2, 8, seed=0, dtype=F64)
    x = torch.randn(3, 4, 2, dtype=F64)
    assert not _features_c.usable(m, x)  # structured features: the torch path
    K = empirical_ntk(m, x)
    assert float((K - empirical_ntk(m, x, method="jacobian")).abs().max()) < 1e-12


def test_build_failure_and_self_check_failure_fall_back(fresh, monkeypatch):
    monkeypatch.setattr(loader, "compiler", lambda: "/bin/false")
    _falls_back_exactly("could not build the compiled training kernel")
    if CC is None:
        return
    monkeypatch.setattr(loader, "compiler", lambda: CC)
    monkeypatch.setattr(fast.KERNEL, "table", {})

    def bad_check(lib, d, act):
        raise loader.KernelUnavailable("self-check failed (simulated)")

    monkeypatch.setattr(fast.KERNEL, "self_check", bad_check)
    _falls_back_exactly("self-check failed")


def test_explicit_opt_out_does_not_warn(fresh, monkeypatch):
    monkeypatch.setenv("NTK_RNN_NO_KERNEL", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error", loader.KernelFallbackWarning)
        st = fast.FastStepper(MeanFieldRNN(3, 8, seed=0, dtype=F64), 0.1)
    assert st.backend == "eager" and "NTK_RNN_NO_KERNEL" in st.backend_reason
    monkeypatch.setenv("NTK_RNN_FAST_BACKEND", "eager")
    st = fast.FastStepper(MeanFieldRNN(3, 8, seed=0, dtype=F64), 0.1)
    assert st.backend_reason == "requested (NTK_RNN_FAST_BACKEND=eager)"


# --- structured NTK on several threads ----------------------------------------------------------
@needs_cc
@pytest.mark.parametrize("blocks", [False, True])
def test_structured_threads_split_units_and_agree(monkeypatch, blocks):
    """T threads split the units (each its own features and GEMMs), the partial kernels are
    summed: equal to one thread and to the torch path; torch's thread setting is restored."""
    from ntk_rnn.ntk import structured as st

    model = MeanFieldRNN(3, 1000, dtype=F64, seed=4, init={"b": "uniform", "rho": 0.8})
    g = torch.Generator().manual_seed(5)
    x, x2 = torch.randn(6, 9, 3, generator=g, dtype=F64), torch.randn(5, 7, 3, generator=g,
                                                                       dtype=F64)
    monkeypatch.setattr(st, "C_BLOCK_UNITS", 128)  # several blocks per thread, a partial one
    old = torch.get_num_threads()
    calls = []
    real = st._unit_range
    monkeypatch.setattr(st, "_unit_range", lambda *a, **k: calls.append(a[7:9]) or real(*a, **k))
    try:
        torch.set_num_threads(1)
        K1 = st.structured_ntk(model, x, x2, blocks=blocks)
        assert calls == [(0, 1000)]
        torch.set_num_threads(2)
        calls.clear()
        K2 = st.structured_ntk(model, x, x2, blocks=blocks)
        assert torch.get_num_threads() == 2 and sorted(calls) == [(0, 512), (512, 1000)]
        K2s = st.structured_ntk(model, x, blocks=blocks)
    finally:
        torch.set_num_threads(old)
    monkeypatch.setattr(st, "USE_C", False)
    Kt, Kts = st.structured_ntk(model, x, x2, blocks=blocks), st.structured_ntk(model, x,
                                                                                 blocks=blocks)
    if blocks:
        K1, K2, K2s, Kt, Kts = (torch.stack(list(v.values())) for v in (K1, K2, K2s, Kt, Kts))
    assert float((K2 - K1).abs().max()) <= 1e-13 * float(K1.abs().max())
    assert float((K2 - Kt).abs().max()) <= 1e-12 * float(Kt.abs().max())
    assert float((K2s - Kts).abs().max()) <= 1e-12 * float(Kts.abs().max())


def test_default_cache_is_per_user_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("NTK_RNN_KERNEL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert loader.cache_dir() == tmp_path / "xdg" / "ntk_rnn" / "kernels"
    loader.private_dir(loader.cache_dir())
    for p in (tmp_path / "xdg" / "ntk_rnn", loader.cache_dir()):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o700
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert loader.cache_dir() == tmp_path / ".cache" / "ntk_rnn" / "kernels"


def test_march_override_names_the_build_and_refuses_garbage(monkeypatch):
    """$NTK_RNN_MARCH picks GCC's -march (x86-64-v3: the AVX2 build on an AVX-512 machine); a
    value that is not a -march name is refused with the variable named."""
    from ntk_rnn.csrc import loader
    from ntk_rnn.ntk._features_c import cpu_isa

    monkeypatch.setenv("NTK_RNN_MARCH", "x86-64-v3")
    assert loader._flag_sets()[0][0][0] == "-march=x86-64-v3"
    assert cpu_isa().startswith("AVX2 build (x86-64-v3) on ")
    monkeypatch.setenv("NTK_RNN_MARCH", "native; rm -rf /")
    with pytest.raises(loader.KernelUnavailable, match="NTK_RNN_MARCH"):
        loader._flag_sets()
    monkeypatch.delenv("NTK_RNN_MARCH")
    assert loader._flag_sets()[0][0][0] == "-march=native"
