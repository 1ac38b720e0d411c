"""Packaging: the wheel built from a clean copy of the repository installs (non-editable) into a
fresh venv and its CLI runs from any directory, with the built-in config tree it carries as
``ntk_rnn/conf`` and with a user's own presets on Hydra's search path.

The fresh venvs reuse the packages already installed for the tests (torch and the rest) without
downloading anything: a ``.pth`` file points at a "shadow" of this interpreter's site-packages
(symlinks to every entry except ntk_rnn's own, editable install and its .pth hooks), so the only
ntk_rnn the venv sees is the one installed into it.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e  # builds a wheel and fresh venvs: `make test-e2e`

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 300
SMALL = ["model.width=16", "train.steps=32", "callbacks=none"]
IGNORED = (".git", ".venv", "build", "dist", "site", "outputs", "multirun", "__pycache__",
           ".pytest_cache", ".ruff_cache", ".hypothesis", "*.egg-info")


# --- helpers --------------------------------------------------------------------------------
def clean_copy(dest: Path) -> Path:
    """The repository as a clean clone would hold it (tracked files plus new files git does not
    ignore, as they stand in the working tree), without .venv, build/, egg-info, outputs/."""
    dest.mkdir(parents=True)
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], capture_output=True, check=True).stdout
        files = [f for f in out.decode().split("\0") if f]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (e.g. an sdist)
        shutil.copytree(ROOT, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*IGNORED))
        return dest
    for rel in files:
        src = ROOT / rel
        if src.is_file():  # listed but deleted in the working tree: a clean clone lacks it too
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def _is_ntk_rnn_entry(name: str) -> bool:
    low = name.lower()
    return (low.startswith(("ntk_rnn", "ntk-rnn", "__editable__")) or low.endswith(".pth")
            or low == "__pycache__")


def shadow_site_packages(dest: Path) -> list[Path]:
    """Symlink farms of this interpreter's site-packages without ntk_rnn (its package, its
    dist-info, the editable finder) and without .pth hooks (the editable install's among them)."""
    sites = [Path(p) for p in sys.path if Path(p).name in ("site-packages", "dist-packages")
             and Path(p).is_dir() and Path(p).resolve() != ROOT]
    farms = []
    for i, site in enumerate(dict.fromkeys(sites)):
        farm = dest / f"site{i}"
        farm.mkdir(parents=True)
        for entry in site.iterdir():
            if not _is_ntk_rnn_entry(entry.name):
                (farm / entry.name).symlink_to(entry)
        farms.append(farm)
    return farms


def clean_env(venv_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env["PATH"] = f"{venv_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv_dir)
    env["HYDRA_FULL_ERROR"] = "1"
    env["PIP_NO_INDEX"] = "1"  # nothing may be downloaded
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def run(cmd: list, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=TIMEOUT)
    assert res.returncode == 0, (f"{' '.join(map(str, cmd))} (in {cwd}) exited with "
                                 f"{res.returncode}\n--- stdout\n{res.stdout[-3000:]}\n"
                                 f"--- stderr\n{res.stderr[-5000:]}")
    return res


def make_venv(path: Path, farms: list[Path]) -> Path:
    """A fresh venv from the base interpreter, seeing the shadowed site-packages (and pip)."""
    venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt", clear=True).create(path)
    py = path / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                              "['purelib'])"], capture_output=True, text=True, check=True,
                             env=clean_env(path)).stdout.strip()
    Path(purelib, "_ntk_rnn_test_reuse_deps.pth").write_text(
        "".join(f"{f}\n" for f in farms))
    return py


def write_user_conf(root: Path) -> tuple[Path, Path]:
    """A user's own config dir with a data preset ``data/my_series.yaml`` for their CSV."""
    csv = root / "my_series.csv"
    csv.parent.mkdir(parents=True, exist_ok=True)
    csv.write_text("x,y\n" + "".join(f"{0.1 * (k % 17) - 0.8:.3f},{0.05 * (k % 11):.3f}\n"
                                     for k in range(200)))
    conf = root / "my_conf"
    (conf / "data").mkdir(parents=True)
    (conf / "data" / "my_series.yaml").write_text(
        "# my own series: data=my_series\n"
        "defaults:\n  - csv        # the built-in file preset, then these keys\n"
        f"path: {csv}\ncolumns: [x]\ntarget_column: y\ncycle: true\n")
    return conf, csv


def imported_modules(pkg_dir: Path) -> dict[str, str]:
    """Top-level modules the package imports that are not optional (an import inside a ``try``
    that catches ImportError counts as optional): name -> first file importing it."""
    found: dict[str, str] = {}
    for path in sorted(pkg_dir.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        optional = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Try) and any(
                    h.type is not None and re.search(r"\b(ImportError|ModuleNotFoundError)\b",
                                                     ast.unparse(h.type))
                    for h in node.handlers):
                optional |= {id(n) for b in node.body for n in ast.walk(b)}
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for n in names:
                found.setdefault(n.split(".")[0], str(path.relative_to(pkg_dir.parent)))
    return found


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# --- the build and install, once per module ---------------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    for mod in ("pip", "setuptools"):  # found, not imported (setuptools patches distutils)
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed")
    tmp = tmp_path_factory.mktemp("wheel")
    src = clean_copy(tmp / "src")
    assert not (src / "ntk_rnn" / "conf").exists(), "the checkout must keep conf/ at the top"
    dist = tmp / "dist"
    env = clean_env(Path(sys.prefix))
    env.pop("VIRTUAL_ENV")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", dist, src], cwd=tmp, env=env)
    wheels = sorted(dist.glob("ntk_rnn-*.whl"))
    assert len(wheels) == 1, wheels
    farms = shadow_site_packages(tmp / "shadow")
    venv_dir = tmp / "venv"
    py = make_venv(venv_dir, farms)
    venv_env = clean_env(venv_dir)
    run([py, "-m", "pip", "install", "--no-deps", "-q", wheels[0]], cwd=tmp, env=venv_env)
    work = tmp / "elsewhere"  # not the repository, not the source copy
    work.mkdir()
    user_conf, csv = write_user_conf(tmp / "user")
    return dict(tmp=tmp, src=src, wheel=wheels[0], farms=farms, venv=venv_dir, py=py,
                env=venv_env, work=work, user_conf=user_conf, csv=csv)


def check_run(run_dir: Path) -> dict:
    """metrics.json and the resolved config of a completed run; the config is returned."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics.get("status", "completed") == "completed", metrics
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["model"]["width"] == 16 and cfg["train"]["steps"] == 32, cfg
    return cfg


# --- the tests -----------------------------------------------------------------------------------
def test_wheel_carries_conf_and_kernel_sources(built):
    names = set(zipfile.ZipFile(built["wheel"]).namelist())
    conf = {p.relative_to(built["src"] / "conf").as_posix()
            for p in (built["src"] / "conf").rglob("*") if p.is_file()}
    shipped = {n[len("ntk_rnn/conf/"):] for n in names if n.startswith("ntk_rnn/conf/")}
    assert "config.yaml" in conf and shipped == conf, (
        f"missing {sorted(conf - shipped)}, extra {sorted(shipped - conf)}")
    kernels = {p.name for p in (built["src"] / "ntk_rnn" / "csrc").iterdir()
               if p.suffix in (".c", ".h")}
    assert kernels and all(f"ntk_rnn/csrc/{k}" in names for k in kernels), sorted(names)
    assert not any(n.startswith(("conf/", "tests/", "build/")) for n in names), sorted(names)


def test_install_requires_covers_imports(built):
    """Every third-party module ntk_rnn imports (outside try/except ImportError) belongs to a
    distribution in the wheel's Requires-Dist (no extra)."""
    from importlib.metadata import packages_distributions

    with zipfile.ZipFile(built["wheel"]) as zf:
        meta = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA")))
    required = {canon(re.match(r"[A-Za-z0-9._-]+", line.split(":", 1)[1].strip()).group(0))
                for line in meta.decode().splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line}
    dists = packages_distributions()
    missing = {}
    for mod, where in imported_modules(built["src"] / "ntk_rnn").items():
        if mod in sys.stdlib_module_names or mod in ("ntk_rnn", "__future__"):
            continue
        owners = {canon(d) for d in dists.get(mod, [])}
        if not owners & required:
            missing[mod] = f"{where} (distribution {sorted(owners) or 'not installed'})"
    assert not missing, f"imported but not in install_requires: {missing}"
    assert {"torch", "hydra-core", "omegaconf", "matplotlib"} <= required, required


def test_console_script_runs_from_any_directory(built):
    run_dir = built["tmp"] / "run_script"
    res = run([built["venv"] / "bin" / "ntk-rnn-train", *SMALL, f"hydra.run.dir={run_dir}"],
              cwd=built["work"], env=built["env"])
    cfg = check_run(run_dir)
    assert cfg["data"]["_target_"] == "ntk_rnn.data.VAR1"  # the built-in default
    assert "run complete" in res.stderr
    assert not (built["work"] / "outputs").exists()


def test_module_runs_with_user_config_dir(built):
    """``--config-dir`` adds a user's presets: their own ``data/my_series.yaml``."""
    run_dir = built["tmp"] / "run_module"
    run([built["py"], "-m", "ntk_rnn.train", "--config-dir", built["user_conf"], "data=my_series",
         *SMALL, f"hydra.run.dir={run_dir}"], cwd=built["work"], env=built["env"])
    cfg = check_run(run_dir)
    assert cfg["data"]["_target_"] == "ntk_rnn.data.FileSeries"
    assert cfg["data"]["path"] == str(built["csv"]) and cfg["data"]["target_column"] == "y"


COMPOSE_ALL = r"""
import sys, sysconfig
from pathlib import Path
from hydra import compose, initialize_config_dir
import ntk_rnn.train as t
site = Path(sysconfig.get_paths()["purelib"]).resolve()
assert Path(t.__file__).resolve().is_relative_to(site), t.__file__
conf = Path(t.CONF_DIR).resolve()
assert conf == site / "ntk_rnn" / "conf", conf
user = sys.argv[1]
done = []
with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
    for f in sorted(conf.rglob("*.yaml")):
        group = f.parent.relative_to(conf).as_posix()
        if group == ".":
            continue
        if group.startswith("hydra/"):
            try:
                __import__("hydra_plugins.hydra_submitit_launcher")
            except ImportError:  # the launcher plugin is an extra (cluster)
                continue
        plus = "+" if group == "experiment" else ""
        compose("config", overrides=[f"{plus}{group}={f.stem}"],
                return_hydra_config=group.startswith("hydra/"))
        done.append(f"{group}={f.stem}")
    c = compose("config", overrides=[f"hydra.searchpath=[file://{user}]", "data=my_series"])
    assert c.data._target_ == "ntk_rnn.data.FileSeries", c.data
print(" ".join(done))
"""


def test_every_builtin_config_composes_from_the_wheel(built):
    """Each preset of each group in the installed ``ntk_rnn/conf`` composes (and the package and
    its conf/ come from the venv, not the checkout); ``hydra.searchpath`` finds a user preset."""
    res = run([built["py"], "-c", COMPOSE_ALL, built["user_conf"]], cwd=built["work"],
              env=built["env"])
    conf = built["src"] / "conf"
    groups = {p: p.parent.relative_to(conf).as_posix() for p in conf.rglob("*.yaml")}
    expected = {f"{g}={p.stem}" for p, g in groups.items()
                if g != "." and g.split("/")[0] != "hydra"}  # hydra/launcher: a plugin extra
    done = set(res.stdout.split())
    assert len(expected) >= 10 and expected <= done, sorted(expected - done)


def test_pip_install_source_and_searchpath(built):
    """``pip install .`` (not editable) from a clean copy works too; ``hydra.searchpath`` on the
    command line finds the user's preset."""
    src = clean_copy(built["tmp"] / "src2")
    venv_dir = built["tmp"] / "venv2"
    py = make_venv(venv_dir, built["farms"])
    env = clean_env(venv_dir)
    run([py, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", src],
        cwd=built["tmp"], env=env)
    run_dir = built["tmp"] / "run_searchpath"
    run([venv_dir / "bin" / "ntk-rnn-train", f"hydra.searchpath=[file://{built['user_conf']}]",
         "data=my_series", *SMALL, f"hydra.run.dir={run_dir}"], cwd=built["work"], env=env)
    cfg = check_run(run_dir)
    assert cfg["data"]["path"] == str(built["csv"])
    assert list(venv_dir.glob("lib*/python*/site-packages/ntk_rnn/conf/config.yaml")), (
        "pip install . did not put conf/ into the package")
