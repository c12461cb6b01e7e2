"""fused_linear_generalized_jsd against the reference on materialised logits: loss, grad_hidden, grad_weight."""

import pytest
import torch
from kernel_helpers import BACKENDS, assert_close_scaled, device_for

from mopd_kernels import fused_linear_generalized_jsd
from mopd_kernels.fused_linear_jsd import chunk_rows
from mopd_kernels.reference import fused_linear_generalized_jsd_reference

N, H, H_T, V = 10, 16, 24, 2500


def make(dtype=torch.float32, device="cpu"):
    hs = torch.randn(N, H)
    ws = torch.randn(V, H) / H**0.5 * 3
    ht = torch.randn(N, H_T)
    wt = torch.randn(V, H_T) / H_T**0.5 * 3
    return [x.to(dtype).to(device) for x in (hs, ws, ht, wt)]


def run(fn, hs, ws, ht, wt, upstream=None, **kwargs):
    hs = hs.detach().clone().requires_grad_(True)
    ws = ws.detach().clone().requires_grad_(True)
    loss = fn(hs, ws, ht, wt, **kwargs)
    (loss * upstream).sum().backward() if upstream is not None else loss.backward()
    return loss.detach(), hs.grad, ws.grad


def check(inputs, tol=1e-4, upstream=None, backend="torch", chunk_size=None, **kwargs):
    loss, gh, gw = run(fused_linear_generalized_jsd, *inputs, upstream=upstream, backend=backend,
                       chunk_size=chunk_size, **kwargs)
    ref_kwargs = {k: (v.double().cpu() if torch.is_tensor(v) else v) for k, v in kwargs.items()}
    ref = run(fused_linear_generalized_jsd_reference, *[x.double().cpu() for x in inputs],
              upstream=None if upstream is None else upstream.double().cpu(), **ref_kwargs)
    for got, want in zip((loss, gh, gw), ref):
        assert torch.isfinite(got).all()
        assert_close_scaled(got, want, tol)
    assert gh.dtype == inputs[0].dtype and gw.dtype == inputs[1].dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_matches_reference(backend, alpha, reduction, chunk_size):
    device = device_for(backend)
    weights = torch.tensor([1.0, 0.0, 2.0, 0.5, 1.0, 0.0, 0.0, 1.0, 1.0, 0.25], device=device)
    upstream = torch.randn(N, device=device) if reduction == "none" else None
    check(make(device=device), backend=backend, alpha=alpha, temperature=1.7, weights=weights,
          reduction=reduction, chunk_size=chunk_size, upstream=upstream)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("teacher_temperature", [0.5, 2.0])
def test_teacher_temperature_matches_reference(backend, alpha, teacher_temperature):
    """The teacher's hidden states rescaled inside the fused loss = the reference dividing its logits."""
    device = device_for(backend)
    weights = torch.tensor([1.0, 0.0, 2.0, 0.5, 1.0, 0.0, 0.0, 1.0, 1.0, 0.25], device=device)
    check(make(device=device), backend=backend, alpha=alpha, temperature=1.3, teacher_temperature=teacher_temperature,
          weights=weights, reduction="sum", chunk_size=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16(backend):
    check(make(torch.bfloat16, device=device_for(backend)), tol=3e-2, backend=backend, chunk_size=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_and_scaled_loss(backend):
    """Only the hidden states need a gradient; the loss is rescaled before backward."""
    hs, ws, ht, wt = make(device=device_for(backend))
    hs.requires_grad_(True)
    (fused_linear_generalized_jsd(hs, ws, ht, wt, backend=backend, chunk_size=4) * 0.5).backward()
    h2 = hs.detach().double().cpu().requires_grad_(True)
    (fused_linear_generalized_jsd_reference(h2, ws.double().cpu(), ht.double().cpu(), wt.double().cpu())
     * 0.5).backward()
    assert ws.grad is None
    assert_close_scaled(hs.grad, h2.grad, 1e-4)


def test_all_masked_mean_is_zero():
    hs, ws, ht, wt = make()
    loss, gh, gw = run(fused_linear_generalized_jsd, hs, ws, ht, wt, weights=torch.zeros(N))
    assert loss.item() == 0.0 and (gh == 0).all() and (gw == 0).all()


def test_chunk_size_from_memory_budget():
    # ~512 MiB budget: float32 logits for student+teacher plus 7 float32 temporaries per row on torch.
    rows = chunk_rows(4096, 49152, torch.float32, torch_rows=True)
    assert 200 <= rows <= 512 and rows % 8 == 0
    assert chunk_rows(4096, 49152, torch.float32, torch_rows=True, budget=2**28) < rows
    assert chunk_rows(4096, 49152, torch.bfloat16, torch_rows=False) > 1000
    assert chunk_rows(5, 49152, torch.float32, torch_rows=True) == 5
    assert chunk_rows(4096, 10**9, torch.float32, torch_rows=True) == 1


def test_shape_errors():
    hs, ws, ht, wt = make()
    with pytest.raises(ValueError):
        fused_linear_generalized_jsd(hs, ws[:, :5], ht, wt)
    with pytest.raises(ValueError):
        fused_linear_generalized_jsd(hs, ws, ht[:3], wt)
    with pytest.raises(ValueError):
        fused_linear_generalized_jsd(hs, ws, ht, wt, chunk_size=0)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("teacher_temperature", [None, 0.6])
def test_gradcheck_torch_path(alpha, reduction, teacher_temperature):
    hs = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(13, 5, dtype=torch.float64, requires_grad=True)
    ht, wt = torch.randn(6, 3, dtype=torch.float64), torch.randn(13, 3, dtype=torch.float64)
    weights = torch.tensor([1.0, 0.0, 2.0, 0.5, 1.0, 1.0], dtype=torch.float64)

    def fn(a, b):
        return fused_linear_generalized_jsd(a, b, ht, wt, alpha=alpha, temperature=0.8, weights=weights,
                                            teacher_temperature=teacher_temperature, reduction=reduction,
                                            chunk_size=4, backend="torch")

    assert torch.autograd.gradcheck(fn, (hs, ws), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_autocast_casts_like_linear():
    """Under autocast the matmuls run in the autocast dtype; the float32 weight still gets a float32 grad."""
    hs, ws, ht, wt = make()
    hs.requires_grad_(True)
    ws.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_generalized_jsd(hs, ws, ht, wt, chunk_size=4)
    loss.backward()
    ref = fused_linear_generalized_jsd_reference(*[x.detach().double() for x in (hs, ws, ht, wt)])
    assert ws.grad.dtype == torch.float32 and hs.grad.dtype == torch.float32
    assert abs(loss.item() - ref.item()) < 3e-2 * ref.item()
