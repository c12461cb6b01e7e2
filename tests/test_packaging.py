"""Nothing in the checkout shadows a library: ``python -m``, ``torchrun -m``, ``python -c`` and notebooks put the
repository's root first on ``sys.path``, and pytest adds ``tests/`` (and some tests ``benchmarks/``)."""

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = {"mopd_lightning", "mopd_kernels"}


def importable_names(folder: Path):
    """What ``import <name>`` finds in ``folder`` ahead of site-packages: modules and regular packages (a folder
    without ``__init__.py`` is a namespace portion, which never wins over an installed package)."""
    for entry in folder.iterdir():
        if entry.suffix == ".py":
            yield entry.stem
        elif (entry / "__init__.py").exists():
            yield entry.name


def test_no_folder_on_sys_path_holds_an_installed_library_name():
    installed = set(importlib.metadata.packages_distributions()) - OURS
    assert "kernels" in installed  # Hugging Face's, required by transformers >= 5.25: the name this test is about
    for folder in (ROOT, ROOT / "tests", ROOT / "benchmarks"):
        clashes = sorted(set(importable_names(folder)) & installed)
        assert not clashes, f"{folder} shadows the installed {clashes}"


def test_kernels_from_the_root_is_hugging_faces():
    found = subprocess.run([sys.executable, "-c", "import kernels; print(kernels.__file__)"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert "site-packages" in found, found
    assert "site-packages" in importlib.util.find_spec("kernels").origin  # and inside pytest, tests/ on sys.path


def test_transformers_loads_a_model_with_the_root_first_on_sys_path(tiny_model):
    script = ("import sys; sys.path.insert(0, sys.argv[1]); from transformers import AutoModelForCausalLM; "
              "print(type(AutoModelForCausalLM.from_pretrained(sys.argv[2])).__name__)")
    loaded = subprocess.run([sys.executable, "-c", script, str(ROOT), tiny_model], cwd=ROOT, capture_output=True,
                            text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert loaded.stdout.strip().endswith("ForCausalLM")
