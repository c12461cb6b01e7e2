"""Dynamic sampling (DAPO): a step keeps only the groups its method can learn from, and draws further prompts until it
holds enough of them or its extra rounds run out. Each objective says which groups those are
(``learns_from``): distillation needs a success and a failure to show, GRPO rewards that differ (graded rewards
such as code's share of tests passed give ``[0, .2, .4, 0]`` non-zero advantages), SFT a success; a blend keeps a
group that any of its objectives learns from.

Extra prompts come from the training set (``PromptDataModule.draw_prompts``), seeded by (seed, step, round) and
drawn from this rank's share of the prompts, so rollouts of a prompt stay on one rank and a resumed run draws what
the uninterrupted one did. Every rank runs as many rounds as the rank that needs the most (sharded models generate
in step). ``check_enough_prompts`` makes sure no round finds the rank's share empty.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Tuple

from .config import ConfigError, DynamicSamplingConfig
from .data.example import Example
from .rollouts import Rollouts
from .timing import PhaseTimer

log = logging.getLogger(__name__)


def check_enough_prompts(config: DynamicSamplingConfig, train_prompts: int, batch_size: int, world_size: int) -> None:
    """Every extra round draws a batch of prompts not yet in the step from this rank's share of the training set."""
    share = train_prompts // world_size
    needed = batch_size * (config.max_rounds + 1)
    if config.enabled and share < needed:
        raise ConfigError(f"model.dynamic_sampling.max_rounds: {config.max_rounds} extra rounds of data.batch_size="
                          f"{batch_size} prompts need {needed} training prompts per device; there are {share}. "
                          "Lower max_rounds or use more prompts.")


def keep_useful_groups(module, batch: List[Example], rollouts: Rollouts, config: DynamicSamplingConfig,
                       timer: PhaseTimer) -> Tuple[List[Example], Rollouts, Dict[str, float]]:
    """The step's prompts and rollouts after dynamic sampling, and what it did: groups sampled, kept (trained on)
    and dropped, extra rounds, and whether the step ended short of ``min_groups``. ``rollouts`` are ``batch``'s,
    sampled and verified."""
    target = config.min_groups or len(batch)
    drawn: List[Example] = []  # every prompt sampled this step
    useful: List[Tuple[Example, Rollouts, int]] = []  # its groups the method learns from: (prompt, rollouts, group)

    def add(examples: List[Example], sampled: Rollouts) -> None:
        drawn.extend(examples)
        useful.extend((e, sampled, g) for g, (e, members) in enumerate(zip(examples, sampled.groups))
                      if module.method.learns_from([sampled.reward[r] for r in members],
                                                   [sampled.success[r] for r in members]))

    add(batch, rollouts)
    rounds = 0
    while rounds < config.max_rounds and module.all_reduce(float(len(useful) < target)) > 0:
        rounds += 1
        extra = module.trainer.datamodule.draw_prompts(len(batch), f"{module.seed}:dynamic:{module.rollout_batches}:"
                                                       f"{rounds}", {e.id for e in drawn})
        with timer.phase("sample"):
            sampled = module.sample(extra, "train", module.sampling.group_size, module.sampling.temperature,
                                    round=rounds)
        with timer.phase("verify"):
            module.verify(extra, sampled)
        add(extra, sampled)
    kept = useful[:target]
    trained = len(kept) if kept else len(batch)
    stats = {"dynamic_groups_sampled": float(len(drawn)), "dynamic_groups_kept": float(trained),
             "dynamic_groups_dropped": float(len(drawn) - trained), "dynamic_rounds": float(rounds),
             "dynamic_short": float(len(kept) < target)}
    if not kept:
        log.info("dynamic sampling: no group to learn from in %d rounds; this step trains on its batch as drawn",
                 rounds + 1)
        return batch, rollouts, stats
    return [e for e, _, _ in kept], Rollouts.from_groups([(r, g) for _, r, g in kept]), stats
