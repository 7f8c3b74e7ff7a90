"""One distribution, one namespace: the top-level folders import as rotelab.* (editable and wheel)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parents[1]
SUBPACKAGES = ["rotelab.train", "rotelab.probe", "rotelab.store", "rotelab.analyses", "rotelab.tui"]
CHECK = "import importlib, sys; mods = [importlib.import_module(m) for m in sys.argv[1:]]; print('\\n'.join(m.__file__ for m in mods))"


def test_editable_install_maps_the_folders() -> None:
    out = subprocess.run([sys.executable, "-c", CHECK, *SUBPACKAGES], capture_output=True, text=True, check=True, cwd="/")
    files = out.stdout.split()
    for mod, f in zip(SUBPACKAGES, files):
        assert Path(f).parent == ROOT / mod.split(".")[1]


def test_built_wheel_imports_the_namespace(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True,
    )
    wheel = next(tmp_path.glob("rotelab-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "rotelab/resources/relations.yaml" in names and "rotelab/resources/tokenizers/bytelevel/tokenizer.json" in names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)], check=True, capture_output=True)
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", CHECK, "rotelab", *SUBPACKAGES], capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    for f in out.stdout.split():
        assert Path(f).is_relative_to(target), f
