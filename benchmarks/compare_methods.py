"""Methods side by side on the embedded demo: the base model, MOPD, OPD, GRPO, SFT on successes, the blend, and on
request (``--methods``) teacher-OPD and the preference baselines DPO and SimPO.

    python benchmarks/compare_methods.py [--config configs/sci.yaml] [--steps 30] [--seeds 0 1]
        [--methods base mopd opd grpo sft_success blend] [--eval-prompts 100] [--eval-split test]
        [--extra "--model.optim.lr 1e-6"] [--variant "name=--model.peers.n_failure 0"] [--also-eval sci]

Every method trains from the same config (``--config``, as the README's main command runs it) with the same
seeds, prompts and sampling budget, then answers the held-out test prompts: greedy accuracy, mean@k and pass@k,
under the strict verifier (what training optimises) and the lenient one (an answer without the format also counts;
``--verifiers strict`` where the domain has no lenient reading, as code), with bootstrap 95% intervals over prompts
and the paired difference to the base model. Evaluation runs under the trainer's precision (``--extra
"--trainer.precision bf16-mixed"`` evaluates under bf16 autocast, as training ran). A seed sets the
sampling and the embedded data alike (training and test prompts), so the base model is evaluated once per
seed and differences are paired within a seed. Training curves come
from the per-step logs. Each finished run is cached in ``<out>/runs/``; re-running skips it.

Writes ``<out>.json``, ``<out>.md`` and ``<out>.png`` (default ``benchmarks/results/compare_sci``).
``teacher_opd``'s teacher is the initial student unless ``--teacher PATH`` names one. ``--extra`` adds settings to
every arm; ``--variant name=settings`` adds an arm of its own. Settings are chosen with ``--eval-split
validation``; the test split only reports.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import lightning.pytorch as pl
import torch

from mopd_lightning.analysis import bootstrap_mean
from mopd_lightning.cli import MOPDCLI, MOPDTrainer
from mopd_lightning.data import PromptDataModule
from mopd_lightning.data.domains import DOMAINS
from mopd_lightning.module import MOPDModule
from mopd_lightning.rewards import get_verifier, verify_batch

ROOT = Path(__file__).resolve().parents[1]
ARMS = {  # arm -> settings over the config: the method, and for the distillation arms whether GRPO is blended in
    "mopd": ["--model.method", "mopd", "--model.grpo.weight", "0"],
    "opd": ["--model.method", "opd", "--model.grpo.weight", "0"],
    "grpo": ["--model.method", "grpo"],
    "sft_success": ["--model.method", "sft_success"],
    "blend": ["--model.method", "mopd", "--model.grpo.weight", "0.5"],
    "teacher_opd": ["--model.method", "teacher_opd", "--model.grpo.weight", "0"],
    "dpo": ["--model.method", "dpo"],
    "simpo": ["--model.method", "simpo"],
}
CURVES = ("train/reward", "train/success_rate", "train/entropy", "train/response_len", "train/loss",
          "train/active_fraction", "train/teacher_auc", "train/teacher_auc_answer", "train/teacher_entropy_gap",
          "train/teacher_favours_success_fraction", "train/teacher_favours_failure_fraction")
TEACHER = CURVES[6:]  # the distillation arms' teacher signal, averaged over every step that logged it


class Curves(pl.Callback):
    """The per-step training logs, and every ``every`` steps (and before the first) sampled accuracy (mean@k) on
    each of ``splits``: for the facts control, the trained questions as trained (``train``), shuffled (``test``)
    and unseen (``validation``)."""

    def __init__(self, splits: Dict[str, list], every: int, k: int, batch_size: int, modes: List[str]):
        self.rows: List[Dict[str, float]] = []
        self.evals: List[Dict[str, Any]] = []
        self.splits, self.every, self.k, self.batch_size, self.modes = splits, every, k, batch_size, modes

    def _evaluate(self, trainer, module, step: int) -> None:
        row: Dict[str, Any] = {"step": step}
        for split, examples in self.splits.items():
            scores = evaluate(module, trainer, examples, self.k, self.batch_size, self.modes, greedy=False)
            row.update({f"{split}/{name}": sum(v) / len(v) for name, v in scores.items()})
        self.evals.append(row)
        print(f"   step {step}: " + ", ".join(f"{key} {value:.3f}" for key, value in row.items()
                                             if key.endswith(f"mean@{self.k}_lenient")), flush=True)

    def on_train_start(self, trainer, module):
        if self.every:
            self._evaluate(trainer, module, 0)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        metrics = trainer.callback_metrics
        self.rows.append({k: float(metrics[k]) for k in CURVES + ("time/step_s",) if k in metrics})
        if self.every and trainer.global_step % self.every == 0:
            self._evaluate(trainer, module, trainer.global_step)


def build(config: str, seed: int, extra: List[str]):
    """Module, data and trainer exactly as ``mopd fit --config <config>`` builds them, without logs or
    checkpoints, and without the in-training validation (the comparison evaluates once, at the end)."""
    args = ["--config", config, "--seed_everything", str(seed), "--model.seed", str(seed), "--data.seed", str(seed),
            "--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]",
            "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            *extra]
    cli = MOPDCLI(MOPDModule, PromptDataModule, trainer_class=MOPDTrainer, args=args, run=False,
                  seed_everything_default=seed, save_config_callback=None)
    return cli.model, cli.datamodule, cli.trainer


def metric_names(k: int, modes: List[str]) -> List[str]:
    return [f"{kind}_{mode}" for mode in modes for kind in ("greedy", f"mean@{k}", f"pass@{k}")]


@torch.no_grad()
def evaluate(module: MOPDModule, trainer, examples, k: int, batch_size: int, modes: List[str],
             greedy: bool = True) -> Dict[str, List[float]]:
    """Per prompt: greedy correctness (unless not ``greedy``), and the mean and the best (pass@k) over k sampled
    answers, under each verifier mode; under the trainer's precision (autocast for bf16-mixed)."""
    was_training = module.training
    module.eval()
    kinds = [("greedy", 1, 0.0)] if greedy else []
    kinds.append((f"mean@{k}", k, module.sampling.val_temperature))
    out: Dict[str, List[float]] = {name: [] for name in metric_names(k, modes) if greedy or "greedy" not in name}
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        for kind, n, temperature in kinds:
            with trainer.precision_plugin.forward_context():
                rollouts = module.sample(batch, "test", n, temperature)
            for mode in modes:
                scores = verify_batch(get_verifier(batch[0].verifier, mode == "strict", module.verifier.sandbox),
                                      rollouts.response_text, [batch[g].ground_truth for g in rollouts.group])
                success = [s.reward >= module.verifier.success_threshold for s in scores]
                for p in range(len(batch)):
                    out[f"{kind}_{mode}"].append(sum(success[p * n:(p + 1) * n]) / n)
                    if kind != "greedy":
                        out[f"pass@{k}_{mode}"].append(float(any(success[p * n:(p + 1) * n])))
    module.train(was_training)
    return out


def run_arm(arm: str, seed: int, args) -> Dict[str, Any]:
    extra = args.extra.split() + list(args.arms.get(arm, []))
    if arm == "teacher_opd" and args.teacher:
        extra += ["--model.teacher.kind", "external", "--model.teacher.path", args.teacher]
    steps = 0 if arm == "base" else args.steps
    module, data, trainer = build(args.config, seed, extra + ["--trainer.max_steps", str(max(steps, 1))])
    curve_splits = {}
    if args.eval_every and steps:
        for split in args.curve_splits:
            data.setup({"train": "fit", "validation": "validate", "test": "test"}[split])
            curve_splits[split] = data.datasets[split][: args.eval_prompts]
    curves = Curves(curve_splits, args.eval_every if steps else 0, args.k, args.eval_batch_size, args.verifiers)
    started = time.perf_counter()
    if steps:
        trainer.callbacks.append(curves)
        trainer.fit(module, datamodule=data)
    else:
        module.setup("test")
        module.configure_model()
    train_s = time.perf_counter() - started
    split = "test" if args.eval_split == "test" else "validation"
    data.setup("test" if split == "test" else "validate")
    examples = data.datasets[split][: args.eval_prompts]
    evaluation = evaluate(module, trainer, examples, args.k, args.eval_batch_size, args.verifiers)
    for domain in args.also_eval:  # another domain's test prompts (same seed): does the training harm it?
        others = DOMAINS[domain].embedded("test", seed, data.system_prompt)[: args.eval_prompts]
        evaluation.update({f"{domain}:{name}": values for name, values in
                           evaluate(module, trainer, others, args.k, args.eval_batch_size, args.verifiers).items()})
    return {"arm": arm, "seed": seed, "steps": steps, "settings": extra, "split": split, "train_s": train_s,
            "eval_s": time.perf_counter() - started - train_s, "curves": curves.rows, "eval_curves": curves.evals,
            "prompts": [e.id for e in examples], "per_prompt": evaluation}


def _mean_by_position(lists: List[List[float]]) -> List[float]:
    return [sum(values) / len(values) for values in zip(*lists)]


def summarize(runs: List[Dict[str, Any]], arms: List[str], samples: int) -> Dict[str, Any]:
    """Per arm and metric: the mean over seeds at each prompt position (bootstrap over positions), and the
    difference to the base model, paired within a seed (each seed draws its own embedded prompts)."""
    base = {r["seed"]: r for r in runs if r["arm"] == "base"}
    table = {}
    for arm in arms:
        mine = [r for r in runs if r["arm"] == arm]
        if not mine:
            continue
        table[arm] = {}
        for metric in mine[0]["per_prompt"]:
            entry = {"value": bootstrap_mean(_mean_by_position([r["per_prompt"][metric] for r in mine]), samples)}
            if arm != "base" and all(r["seed"] in base for r in mine):
                differences = []
                for r in mine:
                    reference = base[r["seed"]]
                    if r["prompts"] != reference["prompts"]:
                        raise ValueError(f"{arm} seed {r['seed']} was evaluated on other prompts than the base model")
                    differences.append([v - b for v, b in zip(r["per_prompt"][metric], reference["per_prompt"][metric])])
                entry["vs_base"] = bootstrap_mean(_mean_by_position(differences), samples)
            table[arm][metric] = entry
        table[arm]["seeds"] = [r["seed"] for r in mine]
        table[arm]["train_s"] = sum(r["train_s"] for r in mine) / len(mine)
    return table


def _fmt(stat) -> str:
    return "n/a" if stat["mean"] is None else f"{stat['mean']:.3f} [{stat['low']:.3f}, {stat['high']:.3f}]"


def write(out: Path, runs, table, args, wall_s: float) -> None:
    k = args.k
    names = metric_names(k, args.verifiers)
    names += [f"{domain}:{name}" for domain in args.also_eval for name in names]
    metrics = [m for m in names if any(m in row for row in table.values())]
    meta = {"command": " ".join([Path(sys.executable).name] + sys.argv), "config": args.config, "steps": args.steps,
            "seeds": args.seeds, "eval_prompts": args.eval_prompts, "k": k, "wall_s": wall_s,
            "device": f"CPU {platform.machine()}, {torch.get_num_threads()} threads", "torch": torch.__version__}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "table": table, "runs": runs}, indent=1))
    lines = [f"# Methods compared on `{Path(args.config).name}` ({args.steps} steps, seeds {args.seeds})", "",
             *([args.note, ""] if args.note else []),
             "Settings of each arm: " + "; ".join(f"{a}: `{' '.join(r['settings']) or '(config)'}`"
                                                  for a, r in {r['arm']: r for r in runs}.items()) + ".", "",
             f"Held-out {args.eval_split} prompts: {args.eval_prompts} per seed (each seed generates its own data); mean "
             f"over seeds at each prompt position, bootstrap 95% intervals over positions; `vs base` is the "
             f"difference to the base model on the same prompts. "
             + ("Strict: only the format the prompt asks for counts (`<answer>X</answer>`, `\\boxed{}`); lenient: a bare "
                "answer counts too. " if "lenient" in args.verifiers else "")
             + f"Compute time {wall_s / 3600:.2f} h; command: `{meta['command']}`.", "",
             "| method | " + " | ".join(f"{name.replace('_', ' (')}) | vs base" for name in metrics) + " | train s/seed |",
             "|---" * (2 * len(metrics) + 2) + "|"]
    for arm, row in table.items():
        cells = []
        for metric in metrics:
            if metric not in row:  # a run cached before the metric existed
                cells += ["n/a", "-"]
                continue
            cells += [_fmt(row[metric]["value"]), _fmt(row[metric]["vs_base"]) if "vs_base" in row[metric] else "-"]
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {row['train_s']:.0f} |")
    lines += ["", "Training, first step and mean of the last 5 steps over seeds (reward under each arm's own verifier; "
              "entropy of the student on its own rollouts):", "",
              "| method | reward | entropy (step 0) | entropy | response length | active fraction | "
              + " | ".join(key.replace("train/teacher_", "teacher ").replace("_", " ") + " (all steps)" for key in TEACHER)
              + " |", "|---" * (6 + len(TEACHER)) + "|"]
    for arm in table:
        last = [row for r in runs if r["arm"] == arm for row in r["curves"][-5:]]
        first = [r["curves"][0] for r in runs if r["arm"] == arm and r["curves"]]
        if last:
            mean = {key: sum(row.get(key, 0.0) for row in last) / len(last) for key in CURVES}
            start = sum(row["train/entropy"] for row in first) / len(first)
            every = [row for r in runs if r["arm"] == arm for row in r["curves"]]
            teacher = []
            for key in TEACHER:
                values = [row[key] for row in every if key in row]
                teacher.append(f"{sum(values) / len(values):.2f}" if values else "-")
            lines.append(f"| {arm} | {mean['train/reward']:.3f} | {start:.2f} | {mean['train/entropy']:.2f} | "
                         f"{mean['train/response_len']:.1f} | {mean['train/active_fraction']:.2f} | "
                         + " | ".join(teacher) + " |")
    lines += _eval_curve_lines(runs, table, k)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(out.with_suffix(".png"), runs, table, metrics)
    print("\n".join(lines))


def eval_curves(runs, arm: str, key: str) -> List[tuple]:
    """(step, mean over the arm's seeds) of one evaluated quantity along training, at the steps every seed has."""
    per_seed = [{row["step"]: row[key] for row in r.get("eval_curves", []) if key in row} for r in runs if r["arm"] == arm]
    if not per_seed or not all(per_seed):
        return []
    steps = sorted(set.intersection(*(set(c) for c in per_seed)))
    return [(step, sum(c[step] for c in per_seed) / len(per_seed)) for step in steps]


def _eval_curve_lines(runs, table, k: int) -> List[str]:
    keys = sorted({key for r in runs for row in r.get("eval_curves", []) for key in row
                   if key.endswith(f"mean@{k}_lenient") or key.endswith(f"mean@{k}_strict")})
    if not keys:
        return []
    lines = ["", f"Along training: sampled accuracy (mean@{k}) on each split, mean over seeds (train: the trained "
             "questions as trained; test: the same questions, options shuffled; validation: unseen questions):", "",
             "| method | step | " + " | ".join(key.replace("_", " (") + ")" for key in keys) + " |",
             "|---" * (len(keys) + 2) + "|"]
    for arm in table:
        columns = {key: dict(eval_curves(runs, arm, key)) for key in keys}
        for step in sorted(set().union(*columns.values())):
            lines.append(f"| {arm} | {step} | " + " | ".join(
                f"{columns[key][step]:.3f}" if step in columns[key] else "-" for key in keys) + " |")
    return lines


def plot(path: Path, runs, table, metrics: List[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve_keys = sorted({key for r in runs for row in r.get("eval_curves", []) for key in row
                         if "mean@" in key and key.endswith("_lenient")})
    fig, axes = plt.subplots(1, 4 + len(curve_keys), figsize=(5 * (4 + len(curve_keys)), 4.5))
    for ax, key in zip(axes[4:], curve_keys):
        for arm in table:
            points = eval_curves(runs, arm, key)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=arm)
        ax.set_xlabel("step")
        ax.set_title(f"{key} (mean over seeds)")
        ax.legend(fontsize=8)
    for ax, key in zip(axes[:3], ("train/reward", "train/entropy", "train/response_len")):
        for arm in table:
            curves = [r["curves"] for r in runs if r["arm"] == arm and r["curves"]]
            if not curves:
                continue
            n = min(map(len, curves))
            ax.plot(range(n), [sum(c[i].get(key, float("nan")) for c in curves) / len(curves) for i in range(n)],
                    label=arm)
        ax.set_xlabel("step")
        ax.set_title(f"{key} (mean over seeds)")
        ax.legend(fontsize=8)
    arms = list(table)
    for m, metric in enumerate(metrics):
        offset = 0.6 * (m / max(len(metrics) - 1, 1) - 0.5)
        stats = [table[a][metric]["value"] for a in arms if metric in table[a]]
        if len(stats) < len(arms):
            continue
        axes[3].errorbar([i + offset for i in range(len(arms))], [s["mean"] for s in stats],
                         yerr=[[s["mean"] - s["low"] for s in stats], [s["high"] - s["mean"] for s in stats]],
                         fmt="o", capsize=3, label=metric)
    axes[3].set_xticks(range(len(arms)))
    axes[3].set_xticklabels(arms, rotation=30, ha="right")
    axes[3].set_title("held-out accuracy (95% interval)")
    axes[3].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "sci.yaml"))
    parser.add_argument("--methods", nargs="+", default=["base", "mopd", "opd", "grpo", "sft_success", "blend"])
    parser.add_argument("--variant", action="append", default=[], help="NAME=SETTINGS: one more arm")
    parser.add_argument("--extra", default="", help="settings added to every arm")
    parser.add_argument("--eval-split", choices=["test", "validation"], default="test")
    parser.add_argument("--also-eval", nargs="*", default=[], metavar="DOMAIN",
                        help="also answer these domains' embedded test prompts (e.g. sci: does training harm it?)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eval-prompts", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=0, metavar="N",
                        help="also evaluate sampled accuracy on --curve-splits every N training steps (and at step 0)")
    parser.add_argument("--curve-splits", nargs="+", choices=["train", "test", "validation"],
                        default=["train", "test", "validation"])
    parser.add_argument("--eval-batch-size", type=int, default=25)
    parser.add_argument("-k", type=int, default=4)
    parser.add_argument("--verifiers", nargs="+", choices=["strict", "lenient"], default=["strict", "lenient"],
                        help="verifier modes to evaluate under (code and tool have only strict)")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--teacher", default=None, help="teacher checkpoint for teacher_opd (default: the frozen "
                        "initial student)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compare_sci"))
    parser.add_argument("--note", default="", help="a paragraph for the report (what the config held, the load)")
    args = parser.parse_args()
    args.arms = {name: list(settings) for name, settings in ARMS.items()}
    for variant in args.variant:
        name, _, settings = variant.partition("=")
        args.arms[name] = settings.split()
        if name not in args.methods:
            args.methods.append(name)
    unknown = [m for m in args.methods if m != "base" and m not in args.arms]
    if unknown:
        parser.error(f"unknown methods {unknown}; known: base, {', '.join(args.arms)}")
    out = Path(args.out)
    cache = out.parent / "runs" / out.name
    cache.mkdir(parents=True, exist_ok=True)
    runs = []
    for arm in args.methods:
        for seed in args.seeds:
            path = cache / f"{arm}_seed{seed}_steps{args.steps}.json"
            if path.exists():
                runs.append(json.loads(path.read_text()))
                continue
            print(f"== {arm}, seed {seed}", flush=True)
            result = run_arm(arm, seed, args)
            path.write_text(json.dumps(result))
            runs.append(result)
            print(f"   trained {result['train_s']:.0f} s, evaluated {result['eval_s']:.0f} s", flush=True)
    table = summarize(runs, args.methods, args.bootstrap)
    write(out, runs, table, args, sum(r["train_s"] + r["eval_s"] for r in runs))


if __name__ == "__main__":
    main()
