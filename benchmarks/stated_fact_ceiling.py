"""Can the student use a fact once it knows it? The ceiling of the training control, measured before any training.

Learning a fact of the training control can raise accuracy only if a model that holds the fact picks its option.
This states the fact in the prompt ("Fact: the answer to ... is Lorel.") and samples the base student on unseen
questions of the control, with and without the statement, in the control's two answer forms: by letter (domain
``facts_few``, read by the lenient science verifier, as ``configs/facts_learnable.yaml`` reads it) and by name
(domain ``facts_named``: options listed without letters, the lenient ``named`` verifier). Both domains draw the
same questions with their options in the same orders. Where stating the fact does not raise accuracy, no training
method can raise it by teaching the fact: the answer form, not the method, is what caps the control.

    python benchmarks/stated_fact_ceiling.py [--seed 0] [--prompts 32] [-k 4]

Writes ``<out>.json`` and ``<out>.md`` (default ``benchmarks/results/stated_fact_ceiling``). The four conditions use
the same sampling seeds per question (paired); intervals are bootstrap 95% over questions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

from compare_methods import build
from mopd_lightning.analysis import bootstrap_mean
from mopd_lightning.data.domains import DOMAINS
from mopd_lightning.data.example import Example
from mopd_lightning.rewards import get_verifier, verify_batch

ROOT = Path(__file__).resolve().parents[1]
FORMS = {"letter": "facts_few", "name": "facts_named"}
"""Each answer form's domain: the same questions, asked for a letter or for a name."""


def question_line(example: Example) -> str:
    """The question without its options and instruction."""
    return example.question.split("\n", 1)[0]


def stated(example: Example) -> Example:
    """The same example with its fact stated as a sentence before the question."""
    fact = f'Fact: the answer to "{question_line(example)}" is {example.meta["fact"]}.\n\n'
    return dataclasses.replace(example, messages=example.messages[:-1] + [
        {"role": "user", "content": fact + example.question}])


@torch.no_grad()
def success(module, examples: List[Example], k: int, batch_size: int) -> List[float]:
    """Per question: the share of ``k`` sampled answers that the question's own verifier (lenient) accepts."""
    out = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        rollouts = module.sample(batch, "test", k, module.sampling.val_temperature)
        scores = verify_batch(get_verifier(batch[0].verifier, strict=False), rollouts.response_text,
                              [batch[g].ground_truth for g in rollouts.group])
        rewards = [score.reward for score in scores]
        out += [sum(rewards[p * k:(p + 1) * k]) / k for p in range(len(batch))]
    return out


def _fmt(stat: Dict) -> str:
    return f"{stat['mean']:.3f} [{stat['low']:.3f}, {stat['high']:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/facts_learnable.yaml", help="the student and its sampling")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("-k", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/stated_fact_ceiling"))
    args = parser.parse_args()
    module, data, _ = build(args.config, args.seed, [])
    module.setup("validate")
    module.configure_model()
    module.eval()
    started = time.perf_counter()
    per_question = {}
    for form, domain in FORMS.items():
        examples = DOMAINS[domain].embedded("validation", data.seed, data.system_prompt)[: args.prompts]
        for told in (False, True):
            condition = f"{form}{' + fact stated' if told else ''}"
            per_question[condition] = success(module, [stated(e) if told else e for e in examples], args.k,
                                              args.batch_size)
            print(f"{condition}: {sum(per_question[condition]) / len(examples):.3f}", flush=True)
    rows = []
    for form in FORMS:
        plain, told = per_question[form], per_question[f"{form} + fact stated"]
        rows.append({"form": form, "without": bootstrap_mean(plain), "with": bootstrap_mean(told),
                     "difference": bootstrap_mean([t - p for p, t in zip(plain, told)])})
    wall_s = time.perf_counter() - started
    command = " ".join(["python", "benchmarks/stated_fact_ceiling.py", *sys.argv[1:]])
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows, "per_question": per_question,
                                                    "wall_s": wall_s, "machine": platform.platform()}, indent=1))
    lines = [f"# Can the student use a fact it is told? (`{args.config}`, base student, seed {args.seed})", "",
             f"{args.prompts} unseen questions x {args.k} samples each condition, the same seeds across conditions; "
             f"2-core CPU, nothing else running; {wall_s / 60:.1f} min. Command: `{command}`.", "",
             "| answer form | without the fact | with the fact stated | difference |", "|---|---|---|---|"]
    lines += [f"| {r['form']} | {_fmt(r['without'])} | {_fmt(r['with'])} | {_fmt(r['difference'])} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
