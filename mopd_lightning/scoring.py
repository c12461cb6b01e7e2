"""Forward passes that score responses: hidden states at the positions that predict each response token.

Student and teacher read different prompts but the same response tokens, so both yield one hidden
state per response token, in the same order. The loss then applies the output projection itself (in
chunks, or fused), so the full ``(tokens x vocabulary)`` logits of whole sequences never exist.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch


def plan_micro_batches(lengths: Sequence[int], max_tokens: int) -> List[List[int]]:
    """Group row indices so that rows x longest row stays within ``max_tokens`` (a longer row goes alone).

    Rows are sorted by length first, so rows of similar length share a micro-batch and little is padding.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: List[List[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[i] <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def response_hidden_states(model, sequences: List[List[int]], response_lengths: List[int], pad_id: int) -> torch.Tensor:
    """Final hidden states ``(sum(response_lengths), H)`` at the positions predicting each response token.

    ``sequences[i]`` is a prompt followed by a response of ``response_lengths[i]`` tokens. Rows are right
    padded, so the real tokens keep positions 0..n-1 whatever the padding.
    """
    device = next(model.parameters()).device
    width = max(map(len, sequences))
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for r, ids in enumerate(sequences):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        attention_mask[r, : len(ids)] = 1
    hidden = model.base_model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).last_hidden_state
    rows = torch.cat([torch.full((n,), r, dtype=torch.long) for r, n in enumerate(response_lengths)])
    cols = torch.cat([torch.arange(len(ids) - n - 1, len(ids) - 1) for ids, n in zip(sequences, response_lengths)])
    return hidden[rows.to(device), cols.to(device)]


@torch.no_grad()
def score_rollouts(model, sequences: Dict[int, List[int]], response_lengths: Dict[int, int], pad_id: int,
                   max_tokens: int) -> Dict[int, torch.Tensor]:
    """No-grad hidden states ``(response tokens, H)`` of each rollout, for ``sequences[r] = context ; response``,
    in micro-batches of at most ``max_tokens`` padded tokens (teacher and reference passes, the analysis)."""
    rows = list(sequences)
    hidden: Dict[int, torch.Tensor] = {}
    for batch in plan_micro_batches([len(sequences[r]) for r in rows], max_tokens):
        chosen = [rows[i] for i in batch]
        lengths = [response_lengths[r] for r in chosen]
        states = response_hidden_states(model, [sequences[r] for r in chosen], lengths, pad_id)
        hidden.update(zip(chosen, states.split(lengths)))
    return hidden


def output_weight(model) -> torch.Tensor:
    """The output projection ``(V, H)`` that turns final hidden states into logits."""
    return model.get_output_embeddings().weight
