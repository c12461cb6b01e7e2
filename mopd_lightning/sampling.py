"""Group sampling: each prompt's rollouts drawn with HF ``generate``, reproducibly and batch-independently.

Every rollout has its own random stream, seeded from (seed, step, prompt id, rollout index). Sampling uses
the Gumbel-max trick inside a logits processor: adding Gumbel noise to the (temperature-scaled, top-k/top-p
filtered) logits and taking the argmax draws exactly from the softmax. Because the noise of a row does not
depend on the other rows, a prompt gets the same rollouts whichever rank or batch it lands in, which is
what makes a 2-process DDP run equal a 1-process run. Temperature 0 is greedy decoding (evaluation).
"""

from __future__ import annotations

import hashlib
from typing import List, Sequence

import torch

from .rollouts import Rollouts


def stable_seed(*parts) -> int:
    """A 63-bit seed from any parts, identical across processes (unlike ``hash``)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class SeededSampler:
    """Logits processor that turns greedy decoding into sampling with per-row generators.

    It also records the entropy of the model's next-token distribution (temperature 1) at every step: the
    student's entropy on its own rollouts, for every method, at no extra forward pass.
    """

    def __init__(self, seeds: Sequence[int], temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0):
        self.seeds, self.temperature, self.top_p, self.top_k = list(seeds), temperature, top_p, top_k
        self.generators = None
        self.entropies: List[torch.Tensor] = []  # one (rows,) tensor per generated position, left on the device

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        log_p = scores.float().log_softmax(-1)
        self.entropies.append(-(log_p.exp() * log_p).nan_to_num().sum(-1))
        scores = scores.float() / self.temperature
        if self.top_k and self.top_k < scores.shape[-1]:
            kth = torch.topk(scores, self.top_k, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
            probs = sorted_scores.softmax(-1)
            drop_sorted = (probs.cumsum(-1) - probs) >= self.top_p  # keep the smallest set reaching top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            scores = scores.masked_fill(drop, float("-inf"))
        if self.generators is None:
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        uniform = torch.stack([torch.rand(scores.shape[-1], generator=g, device=scores.device)
                               for g in self.generators])
        gumbel = -torch.log(-torch.log(uniform.clamp_(1e-20, 1.0 - 1e-7)))
        return scores + gumbel


@torch.no_grad()
def sample_groups(model, tokenizer, prompt_ids: List[List[int]], group_size: int, seeds: List[List[int]],
                  max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                  synced: bool = False) -> Rollouts:
    """Draw ``group_size`` rollouts for each prompt; ``seeds[p][k]`` seeds rollout ``k`` of prompt ``p``.

    ``temperature == 0`` decodes greedily (the seeds are then unused). ``synced``: every rank keeps decoding until
    all ranks are done (a sharded model gathers its weights from all ranks at every step).
    """
    from transformers import GenerationConfig, LogitsProcessorList

    rows = [ids for ids in prompt_ids for _ in range(group_size)]
    pad = tokenizer.pad_token_id
    width = max(map(len, rows))
    device = next(model.parameters()).device
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, ids in enumerate(rows):  # left padding: every row ends where generation starts
        input_ids[r, width - len(ids):] = torch.tensor(ids)
        attention_mask[r, width - len(ids):] = 1
    stop = stop_token_ids(model, tokenizer)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=stop)
    processors = [] if temperature == 0 else [SeededSampler([s for group in seeds for s in group], temperature,
                                                            top_p, top_k)]
    # transformers fills what ``config`` leaves unset from the checkpoint's own generation config (instruct models
    # ship a repetition penalty, top-k, ...): rollouts are drawn from softmax(logits / T) after our top-k / top-p,
    # nothing else, so that config is set aside while generating.
    was_training, own_config = model.training, model.generation_config
    model.eval()
    model.generation_config = GenerationConfig()
    try:
        output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                generation_config=config, logits_processor=LogitsProcessorList(processors),
                                synced_gpus=synced)
    finally:
        model.train(was_training)
        model.generation_config = own_config
    new_tokens = output[:, width:].tolist()
    responses, finished = [], []
    for tokens in new_tokens:
        end = next((i for i, t in enumerate(tokens) if t in stop), None)
        responses.append(tokens if end is None else tokens[: end + 1])
        finished.append(end is not None)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    groups = [p for p in range(len(prompt_ids)) for _ in range(group_size)]
    rollouts = Rollouts(groups, rows, responses, texts, finished)
    if processors and processors[0].entropies:
        steps = torch.stack(processors[0].entropies, 1)  # (rows, generated positions)
        lengths = torch.tensor([len(ids) for ids in responses], device=steps.device)
        inside = torch.arange(steps.shape[1], device=steps.device) < lengths[:, None]
        rollouts.entropy = (steps * inside).sum(1).tolist()  # one transfer, after decoding
    return rollouts


def stop_token_ids(model, tokenizer) -> List[int]:
    """The tokenizer's end-of-sequence token and the model's generation config's (chat models add one)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)
