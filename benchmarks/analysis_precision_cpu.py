"""Does the teacher-signal analysis say the same in bfloat16 as in float32? Same rollouts, scored both ways.

    python benchmarks/analysis_precision_cpu.py [--student qwen-coder-0.5b] [--domain code] [--prompts 2]

`mopd analyze --trainer.precision bf16-mixed` runs the forward passes under CPU bf16 autocast (float32 weights); this
says how much faster that is and what it changes. Its rollouts are drawn once (under the same autocast), then every rollout is
scored under each context variant in float32 and under autocast; the script reports, per variant, the largest and
mean absolute difference of the scores (teacher minus student mean log-prob), the spread of the scores across
rollouts for scale, the AUC of each, and the seconds each took. Writes
benchmarks/results/analysis_precision_cpu.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import torch

from mopd_lightning import MOPDModule, PromptDataModule
from mopd_lightning.analysis import score, summarize, teacher_signal_records
from mopd_lightning.config import PeerConfig, SamplingConfig


def scores(records, variant):
    return [score(r, variant) for r in records if r["teacher"][variant]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--student", default="qwen-coder-0.5b")
    parser.add_argument("--domain", default="code")
    parser.add_argument("--prompts", type=int, default=2, help="validation prompts (the first ones)")
    parser.add_argument("--group-size", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=320)
    parser.add_argument("--variants", nargs="+", default=["none", "1S", "2S1F", "random_peer"])
    parser.add_argument("--out", default="benchmarks/results/analysis_precision_cpu")
    args = parser.parse_args()

    data = PromptDataModule(domain=args.domain, val_batch_size=args.prompts)
    data.setup("predict")
    batch = data.datasets["validation"][: args.prompts]
    module = MOPDModule(student=args.student, sampling=SamplingConfig(group_size=args.group_size,
                                                                      max_new_tokens=args.max_new_tokens),
                        peers=PeerConfig(max_peer_tokens=args.max_new_tokens))
    module.setup("predict")
    module.configure_model()
    started = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rollouts = module.sample(batch, "analyze", args.group_size, 1.0)
    sample_s = time.perf_counter() - started
    module.sample = lambda *_args, **_kwargs: copy.deepcopy(rollouts)  # both precisions score these rollouts
    records, seconds = {}, {}
    for precision in ("float32", "bf16-mixed"):
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "float32"):
            records[precision] = teacher_signal_records(module, batch, args.variants)
        seconds[precision] = time.perf_counter() - started
    aucs = {p: summarize(r, args.variants, samples=100)["variants"] for p, r in records.items()}
    rows = {}
    for variant in args.variants:
        full, half = scores(records["float32"], variant), scores(records["bf16-mixed"], variant)
        if not full:
            continue
        differences = [abs(a - b) for a, b in zip(full, half)]
        rows[variant] = {"rollouts": len(full), "max_abs_diff": max(differences),
                         "mean_abs_diff": sum(differences) / len(differences), "spread": max(full) - min(full),
                         "auc_float32": aucs["float32"][variant]["auc"]["mean"],
                         "auc_bf16": aucs["bf16-mixed"][variant]["auc"]["mean"]}
    result = {"student": args.student, "domain": args.domain, "prompts": [e.id for e in batch],
              "group_size": args.group_size, "max_new_tokens": args.max_new_tokens, "sample_bf16_s": sample_s,
              "score_s": seconds, "speedup": seconds["float32"] / seconds["bf16-mixed"], "variants": rows,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                         f"torch {torch.__version__}, {torch.get_num_threads()} threads, nothing else running",
              "records": records}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [f"# Analysis scores in float32 and under bf16 autocast: {args.student}, {args.domain}", "",
             f"`python benchmarks/analysis_precision_cpu.py --student {args.student} --domain {args.domain} "
             f"--prompts {args.prompts}`; {result['machine']}.", "",
             f"{len(rollouts)} rollouts of {args.prompts} prompts (up to {args.max_new_tokens} new tokens), sampled "
             f"once under bf16 autocast ({sample_s:.0f} s), then scored under every variant in float32 "
             f"({seconds['float32']:.0f} s) and under bf16 autocast ({seconds['bf16-mixed']:.0f} s): "
             f"{result['speedup']:.2f}x faster.", "",
             "| context | rollouts | max abs score diff | mean abs score diff | score spread (float32) | AUC float32 | "
             "AUC bf16 |", "|---|---|---|---|---|---|---|"]
    for variant, row in rows.items():
        auc = [f"{row[k]:.3f}" if row[k] is not None else "n/a" for k in ("auc_float32", "auc_bf16")]
        lines.append(f"| {variant} | {row['rollouts']} | {row['max_abs_diff']:.4f} | {row['mean_abs_diff']:.4f} | "
                     f"{row['spread']:.4f} | {auc[0]} | {auc[1]} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
