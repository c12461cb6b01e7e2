"""Group sampling: each prompt's rollouts drawn with HF ``generate``, reproducibly and batch-independently.

Every rollout has its own seed, from (seed, step, prompt id, rollout index). Sampling uses the Gumbel-max trick
inside a logits processor: adding Gumbel noise to the (temperature-scaled, top-k/top-p filtered) logits and
taking the argmax draws exactly from the softmax. The noise is counter-based, a hash of (seed, generated position,
token id) computed for every row in one vectorised operation, so a row's noise does not depend on the other rows
or the padding: a prompt gets the same rollouts whichever rank or batch it lands in, which is what makes a
2-process DDP run equal a 1-process run. Temperature 0 is greedy decoding (evaluation).

Two paths, the same draws: eager (``generate`` with a growing KV cache) and compiled (``model.sampling.compile``:
a static KV cache, prompts and batch rounded up to buckets so the compiled step is reused, not recompiled).
"""

from __future__ import annotations

import hashlib
from typing import List, Optional, Sequence, Tuple

import torch

from .rollouts import Rollouts


def stable_seed(*parts) -> int:
    """A 63-bit seed from any parts, identical across processes (unlike ``hash``)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """``x * constant mod 2**32`` for ``0 <= x < 2**32``, in halves so that no int64 product overflows."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32) on int64 tensors holding values below 2**32: every output bit depends on
    every input bit, so consecutive counters give unrelated values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def row_keys(seeds: torch.Tensor, step: int) -> torch.Tensor:
    """One 32-bit key per row for generated position ``step``, from the row's 63-bit seed."""
    low, high = seeds & _MASK32, seeds >> 32
    return _mix32(low ^ _mix32(high ^ _mix32(torch.full_like(seeds, step))))


def uniform(hashes: torch.Tensor) -> torch.Tensor:
    """32-bit hashes to uniforms strictly inside (0, 1), on their top 23 bits: float32 holds each value exactly, the
    largest 1 - 2**-24 (a uniform rounded to 1 gives infinite Gumbel noise, and NaN on a token filtered to -inf)."""
    return ((hashes >> 9).float() + 0.5) * (1.0 / (1 << 23))


def gumbel_noise(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """Standard Gumbel noise for every (row, token): a counter-based draw, a hash of (row key, token id), for all
    rows at once."""
    tokens = _mix32(torch.arange(vocab, device=keys.device, dtype=torch.int64))
    return -torch.log(-torch.log(uniform(_mix32(keys[:, None] ^ tokens[None, :]))))


def filter_scores(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Scores outside the top-k, then outside the smallest set reaching ``top_p`` of the remaining mass, set to
    -inf. With a top-k the nucleus is found among the k scores alone; the whole vocabulary is sorted only for a
    nucleus without a top-k."""
    vocab = scores.shape[-1]
    if not (top_k and top_k < vocab) and top_p >= 1.0:
        return scores
    if top_k and top_k < vocab:
        best = torch.topk(scores, top_k, dim=-1).values  # sorted, largest first
    else:
        best = torch.sort(scores, descending=True, dim=-1).values
    if top_p < 1.0:
        probs = best.softmax(-1)
        kept = ((probs.cumsum(-1) - probs) < top_p).sum(-1, keepdim=True)  # the smallest set reaching top_p
        threshold = best.gather(-1, kept - 1)
    else:
        threshold = best[..., -1:]
    return scores.masked_fill(scores < threshold, float("-inf"))


def next_token_scores(scores: torch.Tensor, keys: torch.Tensor, temperature: float, top_k: int, top_p: float
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scores whose argmax is a draw from softmax(scores / temperature) after top-k / top-p (the Gumbel-max trick,
    noise from ``keys``), and the entropy of softmax(scores): the model's own distribution, at temperature 1."""
    log_p = scores.float().log_softmax(-1)
    entropy = -(log_p.exp() * log_p).nan_to_num().sum(-1)
    filtered = filter_scores(scores.float() / temperature, top_k, top_p)
    return filtered + gumbel_noise(keys, scores.shape[-1]), entropy


class SeededSampler:
    """Logits processor that turns greedy decoding into sampling, each row from its own seed.

    The noise of a row at generated position t is a function of (its seed, t, token id) alone, whatever the other
    rows or the padding. It also records the entropy of the model's next-token distribution at every step: the
    student's entropy on its own rollouts, for every method, at no extra forward pass.
    """

    def __init__(self, seeds: Sequence[int], prompt_width: int, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, compile_options: Optional[dict] = None):
        self.seeds, self.prompt_width = torch.tensor(list(seeds), dtype=torch.int64), prompt_width
        self.options = (temperature, top_k, top_p)
        self.scores = next_token_scores
        if compile_options is not None:  # one fused kernel per step instead of a launch per operation
            self.scores = torch.compile(next_token_scores, dynamic=False, **compile_options)
        self.entropies: List[torch.Tensor] = []  # one (rows,) tensor per generated position, left on the device

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.seeds = self.seeds.to(scores.device)  # copied once, on the first step
        keys = row_keys(self.seeds, input_ids.shape[1] - self.prompt_width)
        noisy, entropy = self.scores(scores, keys, *self.options)
        self.entropies.append(entropy)
        return noisy


COMPILE_BACKEND = "inductor"  # what model.sampling.compile compiles with


def bucket(size: int, smallest: int) -> int:
    """``size`` rounded up to a power of two (at least ``smallest``). Compiled decoding pads prompts and rows to
    buckets so that the KV cache's shape repeats across steps and the compiled step is reused: powers of two keep
    the number of shapes, hence of compilations, logarithmic in the longest prompt and the largest batch (a
    recompilation costs about as much as the first compilation, and dynamo stops compiling after a few)."""
    return max(smallest, 1 << max(size - 1, 0).bit_length())


SHORTEST_PROMPT_BUCKET, FEWEST_ROWS_BUCKET = 64, 8


@torch.no_grad()
def sample_groups(model, tokenizer, prompt_ids: List[List[int]], group_size: int, seeds: List[List[int]],
                  max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                  synced: bool = False, compiled: Optional[str] = None) -> Rollouts:
    """Draw ``group_size`` rollouts for each prompt; ``seeds[p][k]`` seeds rollout ``k`` of prompt ``p``.

    ``temperature == 0`` decodes greedily (the seeds are then unused). ``synced``: every rank keeps decoding until
    all ranks are done (a sharded model gathers its weights from all ranks at every step). ``compiled``: the
    ``torch.compile`` backend of the fast path (a static KV cache, the decoding step and the sampler compiled; on
    CUDA, inductor replays the step as a CUDA graph); None decodes eagerly with a growing cache.
    """
    from transformers import GenerationConfig, LogitsProcessorList

    rows = [ids for ids in prompt_ids for _ in range(group_size)]
    row_seeds = [s for group in seeds for s in group]
    width = max(map(len, rows))
    options = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                   eos_token_id=stop_token_ids(model, tokenizer))
    compile_options = None
    if compiled is not None:
        width = bucket(width, SHORTEST_PROMPT_BUCKET)
        spare = bucket(len(rows), FEWEST_ROWS_BUCKET) - len(rows)  # rows decoded only for the shape; dropped below
        rows, row_seeds = rows + rows[:1] * spare, row_seeds + row_seeds[:1] * spare
        options.update(cache_implementation="static", compile_config=compile_config(model, compiled))
        compile_options = {"backend": compiled}
    input_ids, attention_mask = left_padded(rows, width, tokenizer.pad_token_id)
    processors = [] if temperature == 0 else [SeededSampler(row_seeds, width, temperature, top_p, top_k,
                                                            compile_options)]
    # transformers fills what the config leaves unset from the checkpoint's own generation config (instruct models
    # ship a repetition penalty, top-k, ...): rollouts are drawn from softmax(logits / T) after our top-k / top-p,
    # nothing else, so that config is set aside while generating.
    was_training, own_config = model.training, model.generation_config
    model.eval()
    model.generation_config = GenerationConfig()
    device = next(model.parameters()).device
    try:
        output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                generation_config=GenerationConfig(**options),
                                logits_processor=LogitsProcessorList(processors), synced_gpus=synced)
    finally:
        model.train(was_training)
        model.generation_config = own_config
    count = len(prompt_ids) * group_size
    return finished_rollouts(tokenizer, prompt_ids, group_size, output[:count, width:].tolist(),
                             options["eos_token_id"], processors[0].entropies if processors else [])


def left_padded(rows: List[List[int]], width: int, pad: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, every row ending where generation starts."""
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, ids in enumerate(rows):
        input_ids[r, width - len(ids):] = torch.tensor(ids)
        attention_mask[r, width - len(ids):] = 1
    return input_ids, attention_mask


def compile_config(model, backend: str):
    """transformers compiles the decoding step when the KV cache is static: on CUDA as CUDA graphs
    (``reduce-overhead``: one replay per token instead of a launch per operation); on other devices only when
    asked, which this is."""
    from transformers import CompileConfig

    cuda = next(model.parameters()).device.type == "cuda"
    config = CompileConfig(backend=backend, mode="reduce-overhead" if cuda and backend == "inductor" else None,
                           fullgraph=False, dynamic=False)
    config._compile_all_devices = True  # noqa: SLF001 - transformers' own switch for compiling off CUDA
    return config


def finished_rollouts(tokenizer, prompt_ids: List[List[int]], group_size: int, new_tokens: List[List[int]],
                      stop: List[int], entropies: List[torch.Tensor]) -> Rollouts:
    """Each response cut after its first stop token, and the student's entropy summed over the response."""
    responses, finished = [], []
    for tokens in new_tokens:
        end = next((i for i, t in enumerate(tokens) if t in stop), None)
        responses.append(tokens if end is None else tokens[: end + 1])
        finished.append(end is not None)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    groups = [p for p in range(len(prompt_ids)) for _ in range(group_size)]
    rows = [ids for ids in prompt_ids for _ in range(group_size)]
    rollouts = Rollouts(groups, rows, responses, texts, finished)
    if entropies:
        steps = torch.stack(entropies, 1)[: len(responses)]  # (rows, generated positions)
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
