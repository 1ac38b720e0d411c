"""Build hook: the wheel carries the repository's top-level ``conf/`` tree as ``ntk_rnn/conf``.

The metadata lives in setup.cfg. The repository keeps the Hydra config tree at the top level
(``conf/``); ``ntk_rnn.train.conf_dir()`` looks for ``ntk_rnn/conf`` first (an installed wheel)
and falls back to ``<repo>/conf`` (a checkout or an editable install). This ``build_py`` copies
``conf/`` into ``<build_lib>/ntk_rnn/conf`` for every non-editable build (wheel, ``pip install
.``); an editable install copies nothing and keeps reading the repository's ``conf/``. The sdist
carries ``conf/`` through MANIFEST.in.
"""

from __future__ import annotations

import os

from setuptools import setup
from setuptools.command.build_py import build_py as _build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CONF_SRC = os.path.join(HERE, "conf")
CONF_DST = os.path.join("ntk_rnn", "conf")  # inside build_lib


def conf_files() -> list[str]:
    """Every file of the top-level ``conf/`` tree, relative to it (caches and dotfiles skipped)."""
    out = []
    for root, dirs, files in os.walk(CONF_SRC):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        for name in sorted(files):
            if not name.startswith(".") and not name.endswith((".pyc", "~")):
                out.append(os.path.relpath(os.path.join(root, name), CONF_SRC))
    return out


class build_py(_build_py):
    """``build_py`` that also copies ``conf/`` to ``ntk_rnn/conf`` in the build tree."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # editable: ntk_rnn.train falls back to the repository's conf/
        if not os.path.isfile(os.path.join(CONF_SRC, "config.yaml")):
            raise RuntimeError(f"ntk_rnn: {CONF_SRC}/config.yaml is missing: the wheel would "
                               f"ship without its config tree")
        for rel in conf_files():
            target = os.path.join(self.build_lib, CONF_DST, rel)
            self.mkpath(os.path.dirname(target))
            self.copy_file(os.path.join(CONF_SRC, rel), target, preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = list(super().get_outputs(include_bytecode))
        if not getattr(self, "editable_mode", False) and os.path.isdir(CONF_SRC):
            outputs += [os.path.join(self.build_lib, CONF_DST, rel) for rel in conf_files()]
        return outputs


setup(cmdclass={"build_py": build_py})
