"""Loading students and teachers: the embedded demo model, any hub id, or a local checkpoint."""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

from .config import ConfigError
from .embedded_models import EMBEDDED, embedded_model_path
from .scoring import check_logits_are_linear

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_path(name_or_path: str, setting: str = "model.student") -> str:
    """The name of an embedded model (``demo``, ``qwen-coder-0.5b``: fetched and converted once) becomes its cached
    checkpoint's path; an existing folder or a hub id is kept; anything else is the user's typo, named by
    ``setting``."""
    if name_or_path in EMBEDDED:
        return str(embedded_model_path(name_or_path))
    if not os.path.isdir(name_or_path) and (os.path.exists(name_or_path) or not _is_hub_id(name_or_path)):
        raise ConfigError(_not_a_model(name_or_path, setting, "no such folder"))
    return name_or_path


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _not_a_model(name: str, setting: str, why: str) -> str:
    return (f"{setting}: {name!r} is neither an embedded model ({', '.join(EMBEDDED)}), an existing folder, nor a "
            f"hub model reachable from here ({why})")


@contextlib.contextmanager
def _loading(name: str, setting: str):
    """transformers says a hub id it cannot fetch (or a folder without a model) with an OSError and a traceback;
    the user gets one line naming the setting."""
    try:
        yield
    except OSError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(_not_a_model(name, setting, first_line)) from error


def attention_implementation(requested: str = "auto") -> str:
    """flash-attention 2 on a CUDA machine that has it installed, otherwise PyTorch SDPA."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_tokenizer(name_or_path: str, setting: str = "model.student"):
    from transformers import AutoTokenizer

    path = resolve_path(name_or_path, setting)
    with _loading(name_or_path, setting):
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"the tokenizer of {name_or_path!r} has no chat template; prompts are rendered with it")
    return tokenizer


def load_causal_lm(name_or_path: str, dtype: str = "float32", attn_implementation: str = "auto",
                   setting: str = "model.student"):
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype is {dtype!r}; expected one of {sorted(DTYPES)}")
    path = resolve_path(name_or_path, setting)
    with _loading(name_or_path, setting):
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[dtype], attn_implementation=attention_implementation(attn_implementation))
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
