"""LoRA students whose teacher costs one adapter, not one model.

The student trains the adapter ``default`` (peft's LoRA layers injected into the transformers model itself, so every
path that reads its hidden states and output head stays the same; peft directly, not transformers' adapter methods,
which demand a newer peft than the package index has). The teacher shares the student's base weights: an EMA teacher
is a second adapter, ``teacher``, on the same layers, kept as an EMA of the student's adapter; a frozen teacher
(and GRPO's reference, and the initial side of a trust region) is the base with adapters switched off, since a
new LoRA adapter changes nothing; ``self`` is the student's own adapter. Switching is a flag on each LoRA layer.
"""

from __future__ import annotations

import contextlib
import os
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from .config import ConfigError, LoRAConfig

STUDENT, TEACHER = "default", "teacher"


def is_lora(model) -> bool:
    """Whether ``model`` carries LoRA adapters (``add_lora``; peft records them on the model it injects into)."""
    return STUDENT in getattr(model, "peft_config", {})


def add_lora(model, config: LoRAConfig, teacher_adapter: bool, seed: int) -> None:
    """Give ``model`` the trainable student adapter (and, for an EMA teacher, a teacher adapter equal to it); every
    other weight is frozen. The adapter's random start comes from ``seed`` alone, whatever ran before."""
    from peft import LoraConfig, inject_adapter_in_model

    def adapter_config():
        return LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                          target_modules=config.target_modules, base_model_name_or_path=model.name_or_path)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(adapter_config(), model, adapter_name=STUDENT)
    _refuse_head_and_embeddings(model, config)
    if teacher_adapter:
        inject_adapter_in_model(adapter_config(), model, adapter_name=TEACHER)
        with torch.no_grad():
            for teacher, student in adapter_pairs(model):
                teacher.copy_(student)
    _train_student_adapter(model)


def _refuse_head_and_embeddings(model, config: LoRAConfig) -> None:
    """Adapters on the output head or the embeddings would train nothing (the loss reads the base head's weight)
    or go unseen (the EMA teacher, the merged export and the vLLM sync know the linear layers' adapters only)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    reached = [name for name, module in (("output head", model.get_output_embeddings()),
                                         ("embeddings", model.get_input_embeddings()))
               if isinstance(module, BaseTunerLayer)]
    if reached:
        raise ConfigError(f"model.lora.target_modules: {config.target_modules!r} puts adapters on the "
                          f"{' and '.join(reached)}, which are not supported; name linear layers of the decoder "
                          "(q_proj, v_proj, ...) or use all-linear, which leaves the head out")


def _lora_layers(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


def _train_student_adapter(model) -> None:
    for layer in _lora_layers(model):
        layer.enable_adapters(True)
        layer.set_adapter(STUDENT)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(f".{STUDENT}." in name and "lora_" in name)


@contextlib.contextmanager
def adapter(model, name: Optional[str]) -> Iterator[torch.nn.Module]:
    """``model`` run as another adapter (``TEACHER``) or as its base (None) inside the block, then as the student
    again, with only the student's adapter trainable."""
    try:
        for layer in _lora_layers(model):
            if name is None:
                layer.enable_adapters(False)
            else:
                layer.set_adapter(name)
        yield model
    finally:
        _train_student_adapter(model)


def adapter_pairs(model) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(teacher, student) weight of every LoRA matrix."""
    from peft.tuners.lora import LoraLayer

    pairs = []
    for module in model.modules():
        if isinstance(module, LoraLayer) and TEACHER in module.lora_A:
            for matrices in (module.lora_A, module.lora_B):
                pairs.append((matrices[TEACHER].weight, matrices[STUDENT].weight))
    return pairs


@torch.no_grad()
def ema_update_adapter(model, rate: float) -> None:
    """``teacher adapter <- (1 - rate) * teacher adapter + rate * student adapter``, matrix by matrix."""
    for teacher, student in adapter_pairs(model):
        teacher.lerp_(student.to(teacher.dtype), rate)


@torch.no_grad()
def merged_state_dict(model, state: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """Weights as a plain transformers checkpoint, the student's adapter merged into its base layers: of the whole
    ``model``, or of ``state`` (whole tensors under the model's names, e.g. gathered from shards, or only some
    layers' with their adapters)."""
    from peft.tuners.lora import LoraLayer

    state = model.state_dict() if state is None else state
    merged = {key.replace(".base_layer.", "."): value for key, value in state.items() if "lora_" not in key}
    for name, module in model.named_modules():
        a, b = state.get(f"{name}.lora_A.{STUDENT}.weight"), state.get(f"{name}.lora_B.{STUDENT}.weight")
        if isinstance(module, LoraLayer) and a is not None:
            delta = (b.float() @ a.float()) * module.scaling[STUDENT]
            weight = merged[f"{name}.weight"]
            merged[f"{name}.weight"] = weight + (delta.T if module.fan_in_fan_out else delta).to(weight.dtype)
    return merged


def save_adapter(model, path: str, state: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """The student's adapter alone, in peft's format (``PeftModel.from_pretrained(base, path)`` loads it)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    model.peft_config[STUDENT].save_pretrained(path)
    state = model.state_dict() if state is None else state
    state = {f"base_model.model.{key.replace(f'.{STUDENT}.', '.')}": value.detach().contiguous()
             for key, value in state.items() if "lora_" in key and f".{STUDENT}." in key}
    save_file(state, os.path.join(path, "adapter_model.safetensors"))


def save_merged(model, path: str, state: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Save ``model`` (or its gathered ``state``) with the student's adapter merged in, as a plain transformers
    checkpoint (no peft needed to load it)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(model.config)
    plain.load_state_dict(merged_state_dict(model, state), assign=True)
    plain.tie_weights()  # gathered shards bring the tied head as a tensor of its own: saved once, as transformers does
    plain.generation_config = model.generation_config
    plain.save_pretrained(path)
