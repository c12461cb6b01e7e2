"""Fully sharded training (FSDP2) under Lightning's ``ModelParallelStrategy``: student, EMA teacher and reference
sharded the same way, so the EMA update runs shard by shard and checkpoints are saved and resumed sharded.

Each decoder layer is one FSDP unit and the whole model the root unit (embeddings, final norm, output head). Every
forward pass goes through the model's own ``forward`` (see ``scoring.final_hidden_states``), so FSDP gathers each
unit's weights as it goes; the root keeps its weights gathered after its forward, which is where the loss reads the
output projection, and FSDP reduces its gradient with the others. Every rank must run as many forward passes as
the others (each gathers weights from all): the module pads its plans with one-token passes (``MOPDModule.forwards``).
"""

from __future__ import annotations

from typing import Optional

import torch


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The repeated blocks of a transformers causal LM (``model.model.layers`` for Llama, Qwen, Mistral ...)."""
    base = model.base_model
    for name in ("layers", "h", "blocks"):
        layers = getattr(base, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    raise ValueError(f"{type(model).__name__}: no decoder layers found to shard (looked for layers, h, blocks)")


def shard_model(model: torch.nn.Module, mesh) -> torch.nn.Module:
    """Apply FSDP2 to ``model`` in place on the data-parallel ``mesh``: one unit per decoder layer, then the root.
    (Mixed precision is Lightning's: ``trainer.precision: bf16-mixed``.)"""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    return any(hasattr(p, "device_mesh") for p in model.parameters())


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on this rank: a sharded one (DTensor) is gathered from all ranks, a plain one returned."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def reshard(*models: Optional[torch.nn.Module]) -> None:
    """Return sharded models' root weights to their shards. FSDP keeps a root's weights gathered after a forward
    pass without backward (the teacher's, an evaluation's); updates in place (EMA, a weight sync) must see shards."""
    for model in models:
        if model is not None and hasattr(model, "reshard"):
            model.reshard()
