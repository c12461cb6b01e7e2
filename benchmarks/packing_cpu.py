"""Padded vs packed teacher and student passes on the demo model: the same rollouts, in the same run.

    python benchmarks/packing_cpu.py [--prompts 4] [--group-size 4] [--max-new-tokens 64] [--reps 3]

Samples one batch of rollouts with the demo model (lenient verifier, so that groups mix and peer contexts form),
builds each rollout's 2S1F teacher context (its plain prompt where no context forms), then times, alternating
padded and packed for ``--reps`` rounds with the same micro-batch token budget: the teacher pass (no gradient) and
the student pass (forward and backward of the response hidden states). Reports the median seconds, the padded
fraction and packed/padded ratios. Writes benchmarks/results/packing_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from mopd_lightning import MOPDModule, PromptDataModule
from mopd_lightning.config import OptimConfig, SamplingConfig, VerifierConfig
from mopd_lightning.peers import build_teacher_contexts
from mopd_lightning.scoring import padded_fraction, plan_micro_batches, response_hidden_states, score_rollouts


def teacher_pass(module, sequences, lengths, packed):
    start = time.perf_counter()
    score_rollouts(module.student, sequences, lengths, module.tokenizer.pad_token_id,
                   module.optim.max_tokens_per_micro_batch, packed)
    return time.perf_counter() - start


def student_pass(module, sequences, lengths, packed):
    rows = list(sequences)
    start = time.perf_counter()
    for batch in plan_micro_batches([len(sequences[r]) for r in rows], module.optim.max_tokens_per_micro_batch, packed):
        chosen = [rows[i] for i in batch]
        hidden = response_hidden_states(module.student, [sequences[r] for r in chosen], [lengths[r] for r in chosen],
                                        module.tokenizer.pad_token_id, packed)
        hidden.float().pow(2).mean().backward()
    module.student.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=4096, help="micro-batch token budget (model default)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "packing_cpu"))
    args = parser.parse_args()

    data = PromptDataModule(batch_size=args.prompts)
    data.setup("fit")
    batch = data.datasets["train"][: args.prompts]
    module = MOPDModule(sampling=SamplingConfig(group_size=args.group_size, max_new_tokens=args.max_new_tokens),
                        verifier=VerifierConfig(strict=False), optim=OptimConfig(max_tokens_per_micro_batch=args.max_tokens))
    module.setup("fit")
    module.configure_model()
    rollouts = module.sample(batch, "train", args.group_size, 1.0)
    module.verify(batch, rollouts)
    contexts = build_teacher_contexts(batch, rollouts, module.tokenizer, module.peers, seed_key="bench")
    lengths = {r: len(ids) for r, ids in enumerate(rollouts.response_ids) if ids}
    teacher = {r: (contexts[r].prompt_ids if contexts[r].active else rollouts.prompt_ids[r]) + rollouts.response_ids[r]
               for r in lengths}
    student = {r: rollouts.prompt_ids[r] + rollouts.response_ids[r] for r in lengths}

    times = {(phase, packed): [] for phase in ("teacher", "student") for packed in (False, True)}
    for rep in range(args.reps):
        for packed in (False, True):
            times["teacher", packed].append(teacher_pass(module, teacher, lengths, packed))
            times["student", packed].append(student_pass(module, student, lengths, packed))
        print(f"round {rep}: " + ", ".join(f"{p} {'packed' if k else 'padded'} {v[-1]:.2f}s" for (p, k), v in times.items()))
    median = {f"{phase}_{'packed' if packed else 'padded'}_s": statistics.median(v) for (phase, packed), v in times.items()}
    fractions = {f"{name}_padded_fraction": padded_fraction([[len(s) for s in seqs.values()]], args.max_tokens, False)
                 for name, seqs in (("teacher", teacher), ("student", student))}
    result = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "device": f"CPU, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f} at the end",
        "rollouts": len(lengths), "active_contexts": sum(c.active for c in contexts),
        "teacher_tokens": sum(map(len, teacher.values())), "student_tokens": sum(map(len, student.values())),
        **fractions, **median,
        "teacher_ratio_packed_over_padded": median["teacher_packed_s"] / median["teacher_padded_s"],
        "student_ratio_packed_over_padded": median["student_packed_s"] / median["student_padded_s"],
        "rounds": {f"{p}_{'packed' if k else 'padded'}": v for (p, k), v in times.items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [f"# Padded vs packed passes on the demo model ({result['rollouts']} rollouts, "
             f"{result['active_contexts']} with a peer context)", "",
             f"{result['device']}; command: `{result['command']}`; micro-batch budget {args.max_tokens} tokens.", "",
             "| pass | tokens | padded fraction (padded path) | padded s | packed s | packed / padded |",
             "|---|---|---|---|---|---|"]
    for phase in ("teacher", "student"):
        lines.append(f"| {phase} | {result[phase + '_tokens']} | {result[phase + '_padded_fraction']:.1%} | "
                     f"{median[phase + '_padded_s']:.2f} | {median[phase + '_packed_s']:.2f} | "
                     f"{result[phase + '_ratio_packed_over_padded']:.2f} |")
    lines += ["", f"Median of {args.reps} alternating rounds; the packed path computes no padded token."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
