"""Teacher-signal analyses of several models or domains side by side, from their committed reports.

    python benchmarks/analysis_side_by_side.py benchmarks/results/analysis_sci_demo.json \
        benchmarks/results/analysis_code_qwen.json [...] [--out benchmarks/results/analysis_side_by_side]

One column per report: its student, domain and size; the AUC that the student's own log-prob reaches with no teacher;
the AUC of every context; 2S1F's margin over the label-blind controls (paired by prompt), on the whole response and
on the answer span alone (n/a in reports recorded before answer-span scores); the student-to-teacher gap
and entropy gap of 2S1F; and whether the rule for training holds
(2S1F's AUC interval above 0.5, on at least 20 prompts with both outcomes; fewer leave it undecided). Means
over prompts with bootstrap 95% intervals, as the reports computed them. Writes ``<out>.md`` and ``<out>.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mopd_lightning.analysis import DEFAULT_VARIANTS

CONTEXTS = [name for name in DEFAULT_VARIANTS if name != "none"]
DECIDING_PROMPTS = 20
"""Fewer prompts with both outcomes than this and an AUC interval decides nothing (at 2 prompts it can be [1, 1])."""


def interval(stat, signed: bool = False) -> str:
    if stat is None or stat["mean"] is None:
        return "n/a"
    form = "{:+.2f}" if signed else "{:.2f}"
    return f"{form.format(stat['mean'])} [{form.format(stat['low'])}, {form.format(stat['high'])}]"


def column(report: dict) -> dict:
    meta, summary = report["meta"], report["summary"]
    variants = summary["variants"]
    pair = variants.get("2S1F", {})
    rows = {
        "setting": (f"`{meta['student']}`, {_domain(meta)} ({'strict' if meta['verifier']['strict'] else 'lenient'} "
                    f"verifier), {summary['prompts']} prompts x {meta['group_size']}, {meta['max_new_tokens']} new "
                    f"tokens, {meta.get('precision', '32-true')}"),
        "success rate; prompts with both outcomes": f"{summary['success_rate']:.2f}; {summary['mixed_prompts']}",
        "AUC, student's own log-prob (no teacher)": interval(summary.get("student_confidence", {}).get("auc")),
    }
    rows.update({f"AUC, {name}": interval(variants[name]["auc"]) if name in variants else "n/a" for name in CONTEXTS})
    rows.update({
        "2S1F AUC - random_peer (paired)": interval(pair.get("auc_minus_random_peer"), True),
        "2S1F AUC - swapped_labels (paired)": interval(pair.get("auc_minus_swapped_labels"), True),
        "2S1F AUC, answer span only": interval(pair.get("auc_answer")),
        "2S1F answer span - random_peer (paired)": interval(pair.get("auc_answer_minus_random_peer"), True),
        "2S1F answer span - swapped_labels (paired)": interval(pair.get("auc_answer_minus_swapped_labels"), True),
        "2S1F top-1 hit (none: the success rate)": (f"{interval(pair.get('top1_hit'))} "
                                                    f"({interval(variants.get('none', {}).get('top1_hit'))})"),
        "2S1F student-to-teacher gap (nats/token)": interval(pair.get("gap")),
        "2S1F entropy gap (nats)": interval(pair.get("entropy_gap"), True),
        f"2S1F AUC interval above 0.5 (train?; needs {DECIDING_PROMPTS} prompts with both outcomes)":
            _decision(pair.get("auc"), summary["mixed_prompts"]),
        "wall time (2 CPU cores)": f"{meta.get('wall_s', 0) / 60:.0f} min",
    })
    return rows


def _decision(auc, mixed_prompts: int) -> str:
    if mixed_prompts < DECIDING_PROMPTS or auc is None or auc["low"] is None:
        return f"undecided ({mixed_prompts} prompts with both outcomes)"
    return "yes" if auc["low"] > 0.5 else "no"


CONFIG_DOMAINS = {"sci": "sci", "math": "math", "code": "code", "tool": "tool", "peer_control": "facts"}


def _domain(meta: dict) -> str:
    command = str(meta.get("command", ""))
    return next((domain for config, domain in CONFIG_DOMAINS.items() if f"configs/{config}.yaml" in command), "?")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reports", nargs="+")
    parser.add_argument("--out", default="benchmarks/results/analysis_side_by_side")
    args = parser.parse_args()
    columns = {Path(path).stem: column(json.loads(Path(path).read_text())) for path in args.reports}
    names = list(columns)
    lines = ["# Teacher-signal analyses side by side", "",
             "`python benchmarks/analysis_side_by_side.py " + " ".join(args.reports) + "`", "",
             "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for row in columns[names[0]]:
        lines.append(f"| {row} | " + " | ".join(columns[name][row] for name in names) + " |")
    out = Path(args.out)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(columns, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
