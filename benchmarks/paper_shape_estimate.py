"""Paper-shape estimate, on paper: tokens and FLOPs per phase of one MOPD step for Qwen3-8B, and the step time
they predict on 8 H100s, for this library's packed passes and for the reference design that pads every teacher
context to 10,240 tokens.

    python benchmarks/paper_shape_estimate.py [--mean-response 1024 2048 3072] [--mfu 0.4]

Shape: 32 prompts x 8 rollouts, responses up to 4,096 tokens, 2S1F teacher contexts (three peers, each cut to
2,048 tokens), prompts of 300 tokens. Model: 36 layers, hidden 4,096, MLP 12,288, 32 query / 8 key-value heads
of 128, vocabulary 151,936 (untied output layer). Compute phases (teacher forward, student forward + backward)
are FLOPs / (GPUs x peak x MFU); generation is memory-bound and is estimated from the bytes each decode step reads
(weights plus the KV cache) at the HBM bandwidth. These are estimates, not measurements: the assumptions are
printed with the table. Writes benchmarks/results/paper_shape_estimate.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

LAYERS, HIDDEN, MLP, Q_HEADS, KV_HEADS, HEAD_DIM, VOCAB = 36, 4096, 12288, 32, 8, 128, 151_936
PROMPTS, GROUP, MAX_RESPONSE, PEER_CAP, PROMPT_TOKENS, REFERENCE_PAD = 32, 8, 4096, 2048, 300, 10_240
GPUS, PEAK_FLOPS, HBM_BYTES_PER_S = 8, 989e12, 3.35e12  # H100 SXM: dense bf16, HBM3


def layer_params() -> int:
    attention = HIDDEN * (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM + Q_HEADS * HEAD_DIM * HIDDEN
    return LAYERS * (attention + 3 * HIDDEN * MLP)


def forward_flops(length: int, with_head: bool = True) -> float:
    """One causal forward over ``length`` tokens: 2 x params per token, attention scores and values, the head."""
    dense = 2 * layer_params() * length
    attention = 2 * LAYERS * Q_HEADS * HEAD_DIM * length * length  # QK^T and AV over the causal half, x2 FLOPs
    head = 2 * HIDDEN * VOCAB * length if with_head else 0
    return dense + attention + head


def decode_seconds(response: int) -> float:
    """Generation of the group, data-parallel on the GPUs: each decode step reads the weights once and each
    sequence's KV cache so far (bf16)."""
    per_gpu = PROMPTS * GROUP / GPUS
    weights = 2 * (layer_params() + 2 * HIDDEN * VOCAB)
    kv_per_token = 2 * LAYERS * 2 * KV_HEADS * HEAD_DIM  # K and V, bf16
    kv_read = sum(per_gpu * kv_per_token * (PROMPT_TOKENS + t) for t in range(response))
    return (response * weights + kv_read) / HBM_BYTES_PER_S


def estimate(mean_response: int, mfu: float) -> dict:
    rollouts = PROMPTS * GROUP
    peer = min(mean_response, PEER_CAP)
    teacher_len = PROMPT_TOKENS + 3 * peer + mean_response  # the prompt, three peers and the rollout itself
    student_len = PROMPT_TOKENS + mean_response
    throughput = GPUS * PEAK_FLOPS * mfu
    phases = {
        "generation": {"tokens": rollouts * mean_response, "seconds": decode_seconds(mean_response)},
        "teacher (packed)": {"tokens": rollouts * teacher_len, "flops": rollouts * forward_flops(teacher_len)},
        "teacher (reference, padded to 10,240)": {"tokens": rollouts * REFERENCE_PAD,
                                                  "flops": rollouts * forward_flops(REFERENCE_PAD)},
        "student forward + backward": {"tokens": rollouts * student_len, "flops": 3 * rollouts * forward_flops(student_len)},
    }
    for phase in phases.values():
        phase.setdefault("seconds", phase.get("flops", 0) / throughput)
    ours = sum(phases[p]["seconds"] for p in ("generation", "teacher (packed)", "student forward + backward"))
    reference = ours - phases["teacher (packed)"]["seconds"] + phases["teacher (reference, padded to 10,240)"]["seconds"]
    return {"mean_response": mean_response, "teacher_context_tokens": teacher_len, "phases": phases,
            "step_s_packed": ours, "step_s_reference_padding": reference,
            "teacher_flops_saved": 1 - phases["teacher (packed)"]["flops"]
            / phases["teacher (reference, padded to 10,240)"]["flops"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mean-response", type=int, nargs="+", default=[1024, 2048, 3072])
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation of the compute phases")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "paper_shape_estimate"))
    args = parser.parse_args()
    results = [estimate(n, args.mfu) for n in args.mean_response]
    lines = ["# Paper-shape estimate: one MOPD step, Qwen3-8B, 32 x 8 rollouts, 2S1F, on 8 H100s (on paper)", "",
             f"Assumptions: {layer_params() / 1e9:.2f}B layer parameters + {2 * HIDDEN * VOCAB / 1e9:.2f}B embedding "
             f"and output; compute at {args.mfu:.0%} of {PEAK_FLOPS / 1e12:.0f} TFLOP/s per GPU; generation "
             f"memory-bound at {HBM_BYTES_PER_S / 1e12:.2f} TB/s per GPU, 32 sequences per GPU; prompts "
             f"{PROMPT_TOKENS} tokens, peers cut at {PEER_CAP}; every response at the mean length.", ""]
    for r in results:
        over = r["teacher_context_tokens"] > REFERENCE_PAD  # the reference would cut such contexts
        lines += [f"## Mean response {r['mean_response']} tokens (teacher context {r['teacher_context_tokens']} tokens"
                  + (", more than the reference's 10,240: it would truncate)" if over else ")"),
                  "", "| phase | tokens | PFLOP | seconds |", "|---|---|---|---|"]
        for name, phase in r["phases"].items():
            flops = f"{phase['flops'] / 1e15:.0f}" if "flops" in phase else "memory-bound"
            lines.append(f"| {name} | {phase['tokens']:,} | {flops} | {phase['seconds']:.1f} |")
        lines += ["", f"Step: **{r['step_s_packed']:.0f} s** with packed teacher passes, "
                      f"{r['step_s_reference_padding']:.0f} s with the reference's padding "
                      f"({r['step_s_reference_padding'] / r['step_s_packed']:.2f}x); the teacher pass does "
                      f"{r['teacher_flops_saved']:.0%} fewer FLOPs.", ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"mfu": args.mfu, "results": results}, indent=2))
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
