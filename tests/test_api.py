"""The public names the issues and the README use are importable from the package root and are
the implementing modules' own objects (no copies); the package has no import cycles."""

import ast
from pathlib import Path

import ntk_rnn
from ntk_rnn import limit, models, ntk, online, run

PKG = Path(ntk_rnn.__file__).parent


def test_root_reexports():
    assert not [n for n in ntk_rnn.__all__ if not hasattr(ntk_rnn, n)]
    assert ntk_rnn.empirical_ntk is ntk.empirical.empirical_ntk
    assert ntk_rnn.limit_ntk is limit.dispatch.limit_ntk
    assert ntk_rnn.LimitODE is limit.ode.LimitODE
    assert ntk_rnn.FastStepper is online.fast.FastStepper
    assert ntk_rnn.EnsembleStepper is online.ensemble.EnsembleStepper
    assert ntk_rnn.MeanFieldRNN is models.mean_field.MeanFieldRNN
    assert ntk_rnn.Trainer is run.trainer.Trainer


def _module_of(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the ntk_rnn modules it imports (at any depth in the file, lazy ones included)."""
    mods = {_module_of(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                cands = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                cands = [a.name for a in node.names]
            else:
                continue
            for c in cands:
                if c in mods and c != name:
                    deps.add(c)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle among modules (package __init__ re-exports excluded: they import their children)."""
    def edges(m):
        return {d for d in graph[m] if not (d.startswith(m + ".") or m.startswith(d + "."))
                and not _is_pkg_init(d)}

    color, stack = {}, []

    def visit(m):
        color[m] = 1
        stack.append(m)
        for d in edges(m):
            if color.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in color and (cyc := visit(d)):
                return cyc
        color[m] = 2
        stack.pop()
        return None

    for m in graph:
        if m not in color and (cyc := visit(m)):
            return cyc
    return None


def _is_pkg_init(name: str) -> bool:
    return (PKG.parent / name.replace(".", "/") / "__init__.py").exists()


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None, find_cycle(import_graph())


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"a"}}) in (["a", "b", "a"], ["b", "a", "b"])
