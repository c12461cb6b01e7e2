"""Where each method's gradient comes from: the answer token or the rest of the response.

    python benchmarks/answer_token_gradient.py [--config configs/peer_control.yaml] [--prompts 16] [--seeds 0 1]

On one batch of sampled and verified groups (as a training step draws them), the first update's loss of MOPD
(the distillation divergence under the 2S1F context, token mean over the step) and of GRPO (the policy gradient at
ratio 1, token mean) is split into its part on the answer span (the tokens where the verifier read the answer) and
its part on every other token; each part is backpropagated alone. Per method: the tokens' share, the loss's share,
the gradient norm of each part and its cosine with the whole gradient; and where MOPD's target moves on each part
(the teacher's entropy and its log-prob of the sampled token, minus the student's). The teacher-signal analysis says
where the peers' information sits (the answer span, on the positive control); this says how much of an update
follows it, and what else the target carries there.

Writes ``<out>.json`` and ``<out>.md`` (default ``benchmarks/results/answer_token_gradient``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

from mopd_lightning.answers import rollout_parts
from mopd_lightning.cli import MOPDCLI, MOPDTrainer
from mopd_lightning.data import PromptDataModule
from mopd_lightning.loss import distillation_loss, entropy_and_logprobs, token_logprobs
from mopd_lightning.module import MOPDModule
from mopd_lightning.objectives import group_advantages
from mopd_lightning.scoring import output_weight, response_hidden_states

ROOT = Path(__file__).resolve().parents[1]


def build(config: str, seed: int, extra: List[str]):
    """The module (models loaded) and data of ``mopd fit --config <config>``."""
    cli = MOPDCLI(MOPDModule, PromptDataModule, trainer_class=MOPDTrainer, run=False, seed_everything_default=seed,
                  save_config_callback=None,
                  args=["--config", config, "--model.seed", str(seed), "--data.seed", str(seed), "--trainer.logger",
                        "false", *extra])
    cli.datamodule.setup("fit")
    cli.model.setup("fit")
    cli.model.configure_model()
    return cli.model, cli.datamodule


def gradient(module: MOPDModule, loss: torch.Tensor) -> torch.Tensor:
    params = [p for p in module.student.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])


def split(module: MOPDModule, per_token_loss, tokens_of: Dict[str, torch.Tensor], total: int) -> Dict[str, float]:
    """The loss on each part (token mean over all ``total`` tokens), its gradient's norm and cosine with the whole."""
    parts = {name: per_token_loss(mask) / total for name, mask in tokens_of.items()}
    # float64 sums: in float32 over 135M entries the cosine of a part with the whole came out at 1.02
    grads = {name: gradient(module, loss).double() for name, loss in parts.items()}
    whole = grads["answer"] + grads["rest"]  # the whole loss's gradient, as backward is linear
    out = {"loss": float((parts["answer"] + parts["rest"]).detach()), "grad_norm": float(whole.norm())}
    for name, loss in parts.items():
        g = grads[name]
        out[name] = {"tokens": int(tokens_of[name].sum()), "loss": float(loss.detach()),
                     "grad_norm": float(g.norm()),
                     "cosine_with_whole": float(g @ whole / (g.norm() * whole.norm())) if g.norm() > 0 else None}
    return out


def teacher_shift(student, weight, teacher, teacher_weight, tokens, tokens_of, success) -> Dict[str, Dict]:
    """Where the target moves, per part: teacher minus student entropy, and teacher minus student log p of the
    sampled token on successes and on failures (the peers' information: up on successes, down on failures)."""
    s_entropy, s_logp = entropy_and_logprobs(student, weight, tokens)
    t_entropy, t_logp = entropy_and_logprobs(teacher, teacher_weight, tokens)

    def mean(values, mask):  # None where no token has the part (a tiny model rarely names an answer)
        return float(values[mask].mean()) if mask.any() else None

    shift = t_logp - s_logp
    return {name: {"entropy_gap": mean(t_entropy - s_entropy, mask), "logp_shift_success": mean(shift, mask & success),
                   "logp_shift_failure": mean(shift, mask & ~success)} for name, mask in tokens_of.items()}


def measure(config: str, seed: int, prompts: int, extra: List[str]) -> Dict:
    module, data = build(config, seed, ["--model.method", "mopd", "--model.grpo.weight", "0",
                                        "--model.peers.require_success", "false", *extra])
    batch = data.datasets["train"][:prompts]
    rollouts = module.sample(batch, "train", module.sampling.group_size, module.sampling.temperature)
    module.verify(batch, rollouts)
    signal = module.training_signal(batch, rollouts)
    rows = [r for r, context in enumerate(signal.contexts) if context.active and rollouts.response_ids[r]]
    parts = rollout_parts(batch, rollouts, module.tokenizer, module.verifier.strict, rows)
    masks = []
    for r in rows:
        mask = torch.zeros(len(rollouts.response_ids[r]), dtype=torch.bool)
        mask[parts[r]["answer"]] = True
        masks.append(mask)
    answer = torch.cat(masks)
    tokens_of = {"answer": answer, "rest": ~answer}
    hidden = response_hidden_states(module.student, [rollouts.prompt_ids[r] + rollouts.response_ids[r] for r in rows],
                                    [len(rollouts.response_ids[r]) for r in rows], module.tokenizer.pad_token_id)
    weight = output_weight(module.student)
    teacher = torch.cat([signal.teacher_hidden[r] for r in rows])
    tokens = torch.tensor([t for r in rows for t in rollouts.response_ids[r]])
    total = len(tokens)
    targets = teacher_shift(hidden.detach(), weight, teacher, signal.teacher_weight, tokens, tokens_of,
                            torch.tensor([rollouts.success[r] for r in rows for _ in rollouts.response_ids[r]]))
    mopd = split(module, lambda mask: distillation_loss(hidden, weight, teacher, signal.teacher_weight, mask.float(),
                                                        module.method.objectives[0][1].config), tokens_of, total)
    advantages = group_advantages(rollouts, module.grpo)
    per_token_advantage = torch.tensor([advantages[r] for r in rows for _ in rollouts.response_ids[r]])
    logp = token_logprobs(hidden, weight, tokens, temperature=module.sampling.temperature)
    ratio = (logp - logp.detach()).exp()  # 1, with the gradient of log p: GRPO's first update
    grpo = split(module, lambda mask: -(per_token_advantage * ratio * mask).sum(), tokens_of, total)
    return {"seed": seed, "prompts": prompts, "rollouts": len(rollouts),
            "success_rate": sum(rollouts.success) / len(rollouts), "rows_with_context": len(rows), "tokens": total,
            "teacher": targets, "mopd": mopd, "grpo": grpo}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "peer_control.yaml"))
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--extra", default="", help="settings added to the config (e.g. --model.sampling.group_size 8)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "answer_token_gradient"))
    args = parser.parse_args()
    started = time.perf_counter()
    results = [measure(args.config, seed, args.prompts, args.extra.split()) for seed in args.seeds]
    meta = {"command": " ".join([Path(sys.executable).name] + sys.argv), "wall_s": time.perf_counter() - started,
            "device": f"CPU {platform.machine()}, {torch.get_num_threads()} threads", "torch": torch.__version__}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    lines = [f"# Where the gradient comes from: answer span or the rest (`{Path(args.config).name}`)", "",
             f"`{meta['command']}`; {meta['device']}, {meta['wall_s']:.0f} s. One batch of {args.prompts} prompts per "
             "seed, sampled and verified as a step does; the first update's loss split by tokens, each part "
             "backpropagated alone (token mean over all the step's tokens, as the update divides).", "",
             "| seed | method | success rate | answer tokens / all | loss share on the answer | grad norm: answer | "
             "grad norm: rest | cosine (answer, whole) | cosine (rest, whole) |", "|---" * 9 + "|"]

    def cosine(part):
        return "-" if part["cosine_with_whole"] is None else f"{part['cosine_with_whole']:.2f}"

    for r in results:
        for method in ("mopd", "grpo"):
            m = r[method]  # GRPO's loss (minus the advantage, per token) sums to about 0: no share to give
            share = f"{m['answer']['loss'] / m['loss']:.2f}" if method == "mopd" and m["loss"] else "-"
            lines.append(f"| {r['seed']} | {method} | {r['success_rate']:.2f} | {m['answer']['tokens']} / "
                         f"{r['tokens']} | {share} | {m['answer']['grad_norm']:.3g} | {m['rest']['grad_norm']:.3g} | "
                         f"{cosine(m['answer'])} | {cosine(m['rest'])} |")
    lines += ["", "The target on each part, teacher (the 2S1F context) minus student: entropy (nats), and log p of the "
              "sampled token on successes and on failures.", "",
              "| seed | entropy gap: answer | entropy gap: rest | log p shift, answer: success | failure | "
              "log p shift, rest: success | failure |", "|---" * 7 + "|"]
    for r in results:
        cells = [r["teacher"][part][key] for part in ("answer", "rest") for key in
                 ("entropy_gap", "logp_shift_success", "logp_shift_failure")]
        cells = ["-" if c is None else f"{c:+.2f}" for c in cells]
        lines.append(f"| {r['seed']} | {cells[0]} | {cells[3]} | {cells[1]} | {cells[2]} | {cells[4]} | {cells[5]} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
