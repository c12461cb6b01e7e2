"""A tiny random Llama with a byte-level BPE tokenizer built on the spot: the real code path, in seconds."""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "What is the molar mass of H2O? Answer with the letter of the correct option. <answer>A</answer>",
    "Convert 3.5 km to m. A. 3500 m B. 350 m C. 35 m D. 0.35 m. The answer is B because 1 km is 1000 m.",
    "Here is a correct solution from another attempt. Here is an incorrect solution. Now solve the question.",
    "def add(a, b):\n    return a + b\n\\boxed{42} 0123456789 {}[]()<>:;,.!?'\"",
]


def build_tiny_model(folder: Path, vocab_size: int = 320, seed: int = 0, hidden: int = 32, model_type: str = "llama",
                     **config) -> Path:
    """A random ``model_type`` (llama unless said) with the tiny tokenizer; ``config`` adds or overrides settings."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 4, vocab_size=vocab_size, min_frequency=1,
                            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    settings = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=2048,
                    tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**settings, **config})).save_pretrained(folder)
    return folder
