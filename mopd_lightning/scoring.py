"""Forward passes that score responses: hidden states at the positions that predict each response token.

Student and teacher read different prompts but the same response tokens, so both yield one hidden
state per response token, in the same order. The loss then applies the output projection itself (in
chunks, or fused), so the full ``(tokens x vocabulary)`` logits of whole sequences never exist.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence

import torch

from .config import ConfigError
from .loss import entropy_and_logprobs
from .sharding import is_sharded


def micro_batch_tokens(rows: Sequence[int], lengths: Sequence[int], packed: bool) -> int:
    """Tokens a micro-batch computes: the sum of its rows when packed, rows x longest row when padded."""
    if not rows:
        return 0
    return sum(lengths[i] for i in rows) if packed else len(rows) * max(lengths[i] for i in rows)


def plan_micro_batches(lengths: Sequence[int], max_tokens: int, packed: bool = False) -> List[List[int]]:
    """Group row indices so that each micro-batch computes at most ``max_tokens`` tokens (a longer row goes alone).

    Rows are sorted by length first, so rows of similar length share a micro-batch and little is padding.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: List[List[int]] = []
    for i in order:
        if batches and micro_batch_tokens(batches[-1] + [i], lengths, packed) <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def plan_forwards(model, lengths: Sequence[int], max_tokens: int, packed: bool) -> List[List[int]]:
    """:func:`plan_micro_batches`, one forward pass each: packed rows without variable-length attention run alone."""
    plan = plan_micro_batches(lengths, max_tokens, packed)
    if packed and not varlen_attention(model):
        plan = [[i] for batch in plan for i in batch]
    return plan


def padded_fraction(passes: Sequence[Sequence[int]], max_tokens: int, packed: bool) -> float:
    """The share of computed tokens that are padding in forward passes over rows of these lengths, planned by
    :func:`plan_micro_batches` (0 when packed)."""
    real = computed = 0
    for lengths in passes:
        real += sum(lengths)
        computed += sum(micro_batch_tokens(rows, lengths, packed)
                        for rows in plan_micro_batches(lengths, max_tokens, packed))
    return 1.0 - real / computed if computed else 0.0


def response_hidden_states(model, sequences: List[List[int]], response_lengths: List[int], pad_id: int,
                           packed: bool = False) -> torch.Tensor:
    """Final hidden states ``(sum(response_lengths), H)`` at the positions predicting each response token.

    ``sequences[i]`` is a prompt followed by a response of ``response_lengths[i]`` tokens. Padded: rows are right
    padded, so the real tokens keep positions 0..n-1 whatever the padding. Packed, no padded token is computed:
    with flash-attention the rows are one sequence whose positions restart at 0 for each row (its variable-length
    kernel); with other attention one forward per row, since a block-diagonal mask over the whole pack would
    cost more attention than the padding it saves (measured in benchmarks/packing_cpu.py).
    """
    device = next(model.parameters()).device
    if packed and not varlen_attention(model):
        return torch.cat([final_hidden_states(model, input_ids=torch.tensor([ids], device=device))
                          [0, len(ids) - n - 1: len(ids) - 1] for ids, n in zip(sequences, response_lengths)])
    if packed:
        input_ids = torch.tensor([[t for ids in sequences for t in ids]])
        positions = torch.cat([torch.arange(len(ids)) for ids in sequences])[None]
        hidden = final_hidden_states(model, input_ids=input_ids.to(device), position_ids=positions.to(device))[0]
        ends = torch.tensor([len(ids) for ids in sequences]).cumsum(0).tolist()
        cols = torch.cat([torch.arange(end - n - 1, end - 1) for end, n in zip(ends, response_lengths)])
        return hidden[cols.to(device)]
    width = max(map(len, sequences))
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for r, ids in enumerate(sequences):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        attention_mask[r, : len(ids)] = 1
    hidden = final_hidden_states(model, input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
    rows = torch.cat([torch.full((n,), r, dtype=torch.long) for r, n in enumerate(response_lengths)])
    cols = torch.cat([torch.arange(len(ids) - n - 1, len(ids) - 1) for ids, n in zip(sequences, response_lengths)])
    return hidden[rows.to(device), cols.to(device)]


def final_hidden_states(model, **inputs) -> torch.Tensor:
    """The last layer's hidden states ``(B, T, H)``, without logits, times the model's logit scale: the model's
    logits are exactly these times the output projection (``output_weight``).

    An unsharded model runs only its base model. A sharded (FSDP) one runs its own forward, with logits for one
    position, so that FSDP gathers every unit's weights, the output projection's included, for the loss to read.
    """
    scale = logit_scale(model.config)
    if not is_sharded(model):
        hidden = model.base_model(use_cache=False, **inputs).last_hidden_state
        return hidden if scale == 1.0 else hidden * scale
    captured = []
    hook = model.base_model.register_forward_hook(lambda module, args, output: captured.append(output.last_hidden_state))
    try:
        model(use_cache=False, logits_to_keep=1, **inputs)
    finally:
        hook.remove()
    return captured[0] if scale == 1.0 else captured[0] * scale


def logit_scale(config) -> float:
    """The constant some models multiply ``hidden @ W.T`` by (Granite divides by ``logits_scaling``, Cohere
    multiplies by ``logit_scale``). Folded into the hidden states, it keeps logits linear in them, so the fused
    loss, the log-probabilities and the teacher all see the model's own distribution."""
    return (getattr(config, "logit_scale", None) or 1.0) / (getattr(config, "logits_scaling", None) or 1.0)


@torch.no_grad()
def check_logits_are_linear(model, name: str) -> None:
    """Refuse a model whose logits are not its scaled last hidden states times its output projection (Gemma-2's
    final soft-capping, or a transform we do not know): every loss here forms logits from those two."""
    config = model.config
    if getattr(config, "final_logit_softcapping", None):
        raise ConfigError(f"{name!r} ({config.model_type}) soft-caps its logits (final_logit_softcapping="
                         f"{config.final_logit_softcapping}); logits are formed from hidden states and the output "
                         "projection here, so such models are not supported")
    ids = torch.arange(1, 9, device=next(model.parameters()).device)[None] % config.vocab_size
    logits = model(input_ids=ids, use_cache=False).logits.float()
    ours = final_hidden_states(model, input_ids=ids).float() @ output_weight(model).float().T
    error = float((logits - ours).abs().max() / logits.abs().max().clamp_min(1e-6))
    if error > 1e-2:
        raise ConfigError(f"{name!r} ({config.model_type}): its logits differ from its scaled last hidden states times "
                         f"its output projection by {error:.3g} (relative); the transform between them is not one "
                         "this library reproduces, so the model is not supported")


def varlen_attention(model) -> bool:
    """Whether the model attends with flash-attention, which runs packed rows without a dense mask."""
    return "flash" in str(getattr(model.config, "_attn_implementation", ""))


@torch.no_grad()
def score_rollouts(model, sequences: Dict[int, List[int]], response_lengths: Dict[int, int], pad_id: int,
                   max_tokens: int, packed: bool = False, forwards: Callable[[int], int] = int
                   ) -> Dict[int, torch.Tensor]:
    """No-grad hidden states ``(response tokens, H)`` of each rollout, for ``sequences[r] = context ; response``,
    in micro-batches of at most ``max_tokens`` computed tokens (teacher and reference passes, the analysis).

    ``forwards`` maps this rank's number of forward passes to the number to run: a sharded model needs every rank
    to run as many (each gathers weights from all ranks), so the extra ones score a single padding token.
    """
    rows = list(sequences)
    hidden: Dict[int, torch.Tensor] = {}
    plan = plan_forwards(model, [len(sequences[r]) for r in rows], max_tokens, packed)
    plan += [[]] * (forwards(len(plan)) - len(plan))
    device = next(model.parameters()).device
    for batch in plan:
        if not batch:
            final_hidden_states(model, input_ids=torch.tensor([[pad_id]], device=device))
            continue
        chosen = [rows[i] for i in batch]
        lengths = [response_lengths[r] for r in chosen]
        states = response_hidden_states(model, [sequences[r] for r in chosen], lengths, pad_id, packed)
        hidden.update(zip(chosen, states.split(lengths)))
    return hidden


def output_weight(model) -> torch.Tensor:
    """The output projection ``(V, H)`` that turns final hidden states into logits."""
    return model.get_output_embeddings().weight


def mean_logp_and_entropy(hidden: Dict[int, torch.Tensor], weight: torch.Tensor,
                          response_ids: Sequence[Sequence[int]], parts: Dict[int, Dict[str, List[int]]]
                          ) -> Dict[int, Dict[str, Any]]:
    """Per rollout: mean log-prob and entropy (temperature 1) over its tokens, and the mean log-prob over each part
    (None where the part is empty). The analysis and the training step's teacher-signal metrics both score so."""
    out = {}
    for r, h in hidden.items():
        entropy, logp = entropy_and_logprobs(h, weight, torch.tensor(response_ids[r], device=h.device))
        out[r] = {"logp": float(logp.mean()), "entropy": float(entropy.mean()),
                  "parts": {part: float(logp[positions].mean()) if positions else None
                            for part, positions in parts[r].items()}}
    return out


@torch.no_grad()
def choice_mass(hidden: Dict[int, torch.Tensor], weight: torch.Tensor, targets: Dict[int, Any],
                temperatures: Sequence[float]) -> Dict[int, Dict[str, Any]]:
    """Per rollout with a choice target (``answers.choice_targets``): at its answer's first position, the
    probability of the right option's token and its share of the options' mass, at each temperature of the
    distribution (the teacher's ``model.loss.teacher_temperature``), and the entropy there (temperature 1)."""
    out = {}
    for r, target in targets.items():
        if r not in hidden:
            continue
        logits = (hidden[r][target.position] @ weight.T).float()
        log_p = logits.log_softmax(-1)
        entry: Dict[str, Any] = {"entropy": float(-(log_p.exp() * log_p).nan_to_num().sum()), "right": {}, "share": {}}
        for temperature in temperatures:
            p = (logits / temperature).softmax(-1)
            options = p[target.options]
            entry["right"][str(temperature)] = float(options[target.right])
            entry["share"][str(temperature)] = float(options[target.right] / options.sum().clamp_min(1e-30))
        out[r] = entry
    return out
