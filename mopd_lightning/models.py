"""Loading students and teachers: the embedded demo model, any hub id, or a local checkpoint."""

from __future__ import annotations

import importlib.util

import torch

from .config import ConfigError
from .embedded_models import EMBEDDED, embedded_model_path
from .scoring import check_logits_are_linear

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_path(name_or_path: str) -> str:
    """The name of an embedded model (``demo``, ``qwen-coder-0.5b``: fetched and converted once) becomes its cached
    checkpoint's path; anything else (a hub id, a local folder) is kept."""
    if name_or_path in EMBEDDED:
        return str(embedded_model_path(name_or_path))
    return name_or_path


def attention_implementation(requested: str = "auto") -> str:
    """flash-attention 2 on a CUDA machine that has it installed, otherwise PyTorch SDPA."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_path(name_or_path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"the tokenizer of {name_or_path!r} has no chat template; prompts are rendered with it")
    return tokenizer


def load_causal_lm(name_or_path: str, dtype: str = "float32", attn_implementation: str = "auto"):
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype is {dtype!r}; expected one of {sorted(DTYPES)}")
    model = AutoModelForCausalLM.from_pretrained(
        resolve_path(name_or_path), dtype=DTYPES[dtype], attn_implementation=attention_implementation(attn_implementation)
    )
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ConfigError(f"{name_or_path!r}: output projections with a bias are not supported")
    check_logits_are_linear(model, name_or_path)
    return model


def check_same_vocabulary(student_tokenizer, teacher_tokenizer, teacher_name: str) -> None:
    """An external teacher must share the student's tokenizer: the loss compares distributions token by token."""
    if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise ConfigError(f"model.teacher.path: the tokenizer of {teacher_name!r} differs from the student's; "
                         "token-level distillation needs the same vocabulary")
