"""``pip install ./kernels`` alone: torch is all it needs, and ``import mopd_kernels`` brings nothing else."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
USE_ALONE = """
import importlib.util, torch, mopd_kernels
others = [m for m in ("lightning", "transformers", "mopd_lightning", "triton") if importlib.util.find_spec(m)]
assert not others, others
g = torch.Generator().manual_seed(0)
h = torch.randn(8, 16, generator=g, requires_grad=True)
w = torch.randn(50, 16, generator=g, requires_grad=True)
loss = mopd_kernels.fused_linear_generalized_jsd(h, w, torch.randn(8, 16, generator=g), torch.randn(50, 16, generator=g))
loss.backward()
logits = torch.randn(8, 50, generator=g, requires_grad=True)
mopd_kernels.generalized_jsd(logits, torch.randn(8, 50, generator=g), alpha=0.0).backward()
assert loss > 0 and h.grad.abs().sum() > 0 and w.grad.abs().sum() > 0 and logits.grad.abs().sum() > 0
print("used alone:", mopd_kernels.__file__)
"""


@pytest.mark.slow
def test_the_kernels_install_alone_in_a_fresh_environment(tmp_path):
    source = shutil.copytree(ROOT / "kernels", tmp_path / "kernels", ignore=shutil.ignore_patterns("*.egg-info",
                                                                                                     "__pycache__"))
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    python = str(env / "bin" / "python")
    install = subprocess.run([python, "-m", "pip", "install", "--quiet", "-c", str(ROOT / "constraints" / "cpu.txt"),
                              str(source)], capture_output=True, text=True, timeout=1200)
    assert install.returncode == 0, install.stderr[-3000:]
    used = subprocess.run([python, "-c", USE_ALONE], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert used.returncode == 0, used.stderr[-3000:]
    assert str(env) in used.stdout
