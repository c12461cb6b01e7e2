"""Settings of one MOPD step, one small dataclass per concern, each validated where it is built.

LightningCLI turns these into nested config keys (``model.peers.n_success`` ...) and their docstrings
into ``mopd fit --help``. Paper values are noted where they differ from the CPU-friendly defaults.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, fields
from typing import List, Literal, Optional, Union

import torch

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A setting the run cannot honour. The message starts with the setting (``model.peers.n_success: ...``) and
    says what fixes it; ``mopd`` prints it as one line and exits with status 2."""


def _require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{field}: {message}")


@dataclass
class SamplingConfig:
    """How the student draws its group of rollouts for each prompt.

    Attributes:
        backend: ``hf`` (transformers ``generate`` on the student itself) or ``vllm`` (a colocated vLLM engine fed
            the student's weights after every update; settings in ``model.vllm``; an extra, see the README).
        group_size: rollouts per prompt (G); MOPD needs at least 2 (paper: 8).
        temperature: sampling temperature (paper: 1.0). Policy log-probabilities (GRPO's ratio and KL, importance
            weights, SFT's likelihood) are taken at it, as verl and TRL do; the distillation divergence uses
            ``model.loss.temperature``.
        top_p: nucleus sampling mass; 1.0 disables it.
        top_k: sample only among the k most likely tokens; 0 disables it.
        max_new_tokens: longest response (paper: 4096).
        val_greedy: also decode one greedy answer per prompt at validation/test (``greedy_acc``).
        val_samples: sampled rollouts per prompt at validation/test (k of mean@k and pass@k); 0 = none.
        val_temperature: sampling temperature of those k rollouts (greedy decoding is ``val_greedy``).
        compile: ``hf`` backend: decode with a static KV cache and a compiled decoding step (CUDA graphs on a GPU),
            the same draws as the eager path; the first step pays the compilation. Not for FSDP-sharded students.
    """

    backend: Literal["hf", "vllm"] = "hf"
    group_size: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    val_greedy: bool = True
    val_samples: int = 4
    val_temperature: float = 1.0
    compile: bool = False

    def __post_init__(self):
        _require(self.backend in ("hf", "vllm"), "model.sampling.backend", f"is {self.backend!r}; expected hf or vllm")
        _require(self.group_size >= 2, "model.sampling.group_size",
                 f"is {self.group_size}; MOPD builds peer contexts from the other rollouts of a group, so it needs at least 2")
        _require(self.temperature > 0, "model.sampling.temperature", "must be positive")
        _require(0 < self.top_p <= 1, "model.sampling.top_p", "must lie in (0, 1]")
        _require(self.top_k >= 0, "model.sampling.top_k", "must be >= 0")
        _require(self.max_new_tokens >= 1, "model.sampling.max_new_tokens", "must be >= 1")
        _require(self.val_samples >= 0, "model.sampling.val_samples", "must be >= 0")
        _require(self.val_greedy or self.val_samples > 0, "model.sampling",
                 "val_greedy is false and val_samples is 0: validation would measure nothing")
        _require(self.val_temperature > 0, "model.sampling.val_temperature",
                 "must be positive; greedy evaluation is model.sampling.val_greedy")
        _require(not (self.compile and self.backend == "vllm"), "model.sampling.compile",
                 "compiles the hf backend's decoding; vLLM compiles its own (model.vllm)")


@dataclass
class LoRAConfig:
    """LoRA adapters (peft) trained in place of the student's weights. The teacher then shares the student's base:
    ``ema`` is a second adapter kept as an EMA of the student's, ``frozen`` (and ``trust_region``'s initial side, and
    GRPO's reference) the base with adapters off, ``self`` the student's adapter; ``external`` stays a model of its
    own.

    Attributes:
        enabled: train LoRA adapters instead of every weight. The other settings do not turn LoRA on: set while
            it is off, they are named in a warning and every weight trains.
        rank: r, the adapters' inner dimension.
        alpha: scaling numerator: an adapter adds ``alpha / rank * B @ A``.
        dropout: dropout on the adapters' inputs while training.
        target_modules: ``all-linear`` (every linear layer but the output head) or a list of module names
            (``[q_proj, v_proj]``); the output head and the embeddings are refused.
    """

    enabled: bool = False
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: Union[str, List[str]] = "all-linear"

    def __post_init__(self):
        _require(self.rank >= 1, "model.lora.rank", "must be >= 1")
        _require(self.alpha > 0, "model.lora.alpha", "must be positive")
        _require(0 <= self.dropout < 1, "model.lora.dropout", "must lie in [0, 1)")
        _require(bool(self.target_modules), "model.lora.target_modules", "must name modules, or be all-linear")
        changed = [f"model.lora.{f.name}" for f in fields(self)
                   if f.name != "enabled" and getattr(self, f.name) != f.default]
        if changed and not self.enabled:
            log.warning("%s set but model.lora.enabled is false: LoRA is off and every weight trains (set "
                        "model.lora.enabled: true to train adapters)", ", ".join(changed))


@dataclass
class DynamicSamplingConfig:
    """DAPO-style dynamic sampling: a group whose rewards are all equal gives GRPO no gradient, and one without both a
    success and a failure gives MOPD no contrast, so further prompts are drawn until the step holds enough groups
    its method learns from.

    Attributes:
        enabled: keep only the groups the method learns from (distillation: a success and a failure; GRPO: rewards
            that differ, graded ones included; SFT: a success; a blend: any of its parts), drawing extra prompts.
        min_groups: such groups a step aims for on each device; null = the batch's prompts (``data.batch_size``).
        max_rounds: extra rounds of ``data.batch_size`` prompts at most; a step that ends short trains on the
            groups it found (on the batch as drawn when it found none), and the logs say so.
    """

    enabled: bool = False
    min_groups: Optional[int] = None
    max_rounds: int = 3

    def __post_init__(self):
        _require(self.min_groups is None or self.min_groups >= 1, "model.dynamic_sampling.min_groups",
                 "must be null or >= 1")
        _require(self.max_rounds >= 0, "model.dynamic_sampling.max_rounds", "must be >= 0")


@dataclass
class VLLMConfig:
    """The vLLM rollout engine (read when ``model.sampling.backend`` is ``vllm``).

    Attributes:
        dtype: the engine's weight dtype; bfloat16 samples about 2x faster than float32 on the demo (CPU), and its
            log-probs differ from a float32 trainer's by about 0.05 nats per token (logged as the rollout gap).
        gpu_memory_utilization: share of GPU memory the engine may take (weights + KV cache) beside training.
        kv_cache_gb: KV-cache size in GiB; null = from ``gpu_memory_utilization`` on a GPU, 1 GiB on a CPU.
        max_model_len: longest prompt + response the engine accepts; null = the model's own limit.
        sleep: on a GPU, free the engine's memory while the trainer works (vLLM sleep mode, level 1).
        enforce_eager: no CUDA graphs (faster start, slower decoding on a GPU).
        check_sync: after each weight sync, score a fixed probe with the engine and the trainer
            (``train/engine_sync_gap``, mean absolute log-prob difference per token).
        probe_every: with ``check_sync``, also score the probe every this many syncs that sent nothing, so stale
            engine weights show whatever decided what to send; 0: only after syncs that sent weights.
        sync_tolerance: warn when that gap exceeds this (float32 engines match to about 1e-5; bfloat16 to about 0.05).
        importance_sampling: correct the engine/trainer gap (off-policy rollouts) by weighting every method's
            per-token loss with the ratio r = p_trainer / p_engine of the rollout's tokens, taken before the first
            update (verl's and TRL's truncated importance sampling): ``token_truncate`` min(r, cap) per token,
            ``token_mask`` r where r <= cap else 0, ``sequence_truncate`` / ``sequence_mask`` the same with the
            rollout's ratio (the product over its tokens) on all its tokens; ``none`` only logs the gap.
        importance_sampling_cap: C of those weights (default 2, as verl's recipes use; TRL's default is 3).
    """

    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    gpu_memory_utilization: float = 0.3
    kv_cache_gb: Optional[float] = None
    max_model_len: Optional[int] = None
    sleep: bool = True
    enforce_eager: bool = True
    check_sync: bool = True
    probe_every: int = 10
    sync_tolerance: float = 0.2
    importance_sampling: Literal["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = "none"
    importance_sampling_cap: float = 2.0

    def __post_init__(self):
        _require(self.dtype in ("bfloat16", "float16", "float32"), "model.vllm.dtype",
                 f"is {self.dtype!r}; expected bfloat16, float16 or float32")
        _require(0 < self.gpu_memory_utilization < 1, "model.vllm.gpu_memory_utilization", "must lie in (0, 1)")
        _require(self.kv_cache_gb is None or self.kv_cache_gb > 0, "model.vllm.kv_cache_gb", "must be positive or null")
        _require(self.max_model_len is None or self.max_model_len >= 16, "model.vllm.max_model_len",
                 "must be >= 16 or null")
        _require(self.sync_tolerance > 0, "model.vllm.sync_tolerance", "must be positive")
        _require(self.probe_every >= 0, "model.vllm.probe_every", "must be >= 0")
        modes = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
        _require(self.importance_sampling in modes, "model.vllm.importance_sampling",
                 f"is {self.importance_sampling!r}; expected one of {', '.join(modes)}")
        _require(self.importance_sampling_cap >= 1, "model.vllm.importance_sampling_cap",
                 "must be >= 1 (a ratio of 1 means the engine agrees with the trainer)")


PEER_CONTEXTS = ("peers", "none", "random_peer", "unrelated_prompt", "swapped_labels", "success_only_matched")
LABEL_BLIND = ("random_peer", "swapped_labels")
"""Controls whose shown labels say nothing about the peers (``random_peer``) or contradict the verifier
(``swapped_labels``): nothing else in their contexts may state a peer's outcome."""


@dataclass
class PeerConfig:
    """Which peers the teacher sees, and how its context is worded.

    Attributes:
        n_success: successful peers per context, at most (paper's best, 2S1F: 2).
        n_failure: failed peers per context, at most (2S1F: 1).
        failure_when: ``always`` includes failures whenever there are any; ``when_no_success`` only when the
            group holds no other success.
        context: ``peers`` (the method) or an ablation control: ``none`` (the teacher sees the plain prompt),
            ``random_peer`` (n_success + n_failure peers drawn ignoring the verifier, shown with n_success "correct"
            labels and the rest "incorrect" whatever they are, as the reference fills its 2S1F slots: labels that
            say nothing), ``unrelated_prompt`` (the same mix of successes and failures, truly labelled, from the
            other prompts of the batch: never the rollout's own group), ``swapped_labels`` (peers chosen and shown
            as if every label were flipped: every label shown is wrong), ``success_only_matched`` (the failure
            slots filled with further successes).
        control_match: how a control (``random_peer``, ``unrelated_prompt``, ``swapped_labels``,
            ``success_only_matched``) picks its peers: ``block`` at random, as many as its slots; ``token`` as many
            as the method's own context shows, each slot filled with the candidate closest in length (tokens) to
            the peer the method shows there, so that the control differs from it in content, not in length (a
            135M teacher's score moves with its context's length). ``random_peer`` then takes the method's own
            peers (unless lengths tie), its labels shuffled over them. The reference's ``peer_control_match``;
            it matches ``unrelated_prompt`` and ``success_only_matched`` by a running token budget instead.
        require_success: a context without any success peer gives no signal (the rollout is masked and counted);
            off in the paper. Small models that rarely succeed get failure-only contexts, which the analysis
            (``mopd analyze``) shows carry no signal at 135M while still raising the teacher's entropy.
        dont_reprompt_on_self_success: a successful rollout is never shown its own response as a success peer
            (leave-one-out, the reference's setting of the same name; its config turns it on). Off, a success may be
            its own demonstration. Either way a lone success in its group has no other success to be shown:
            ``train/lone_success_fraction`` counts those, ``train/success_without_signal_fraction`` the successes
            left without any context (with ``require_success``, or with no failure to show).
        remove_thinking_from_demonstration: drop ``<think>...</think>`` blocks (and the whitespace after them) from
            success peers before they enter the context, as the reference does for its demonstrations; failure
            peers are shown as written. An unclosed ``<think>`` is left as it is.
        max_peer_tokens: token budget per peer; longer peers lose their middle (a marker shows where).
        include_feedback: add each peer's verifier feedback (off by default, and reported in the logs). Refused
            with ``random_peer`` and ``swapped_labels``: feedback states the peer's outcome.
        self_feedback: the rollout's own verifier feedback at the end of its teacher context (SDPO's signal; the
            reference's ``include_environment_feedback``): ``always``, ``without_success`` (only when the context
            shows no success: the reference's ``environment_feedback_only_without_solution``) or ``never``. A
            rollout with feedback and no peers then gets a context of its own feedback alone. It tells the teacher
            the rollout's own outcome (the analysis reports it apart).
        success_template: block for one successful peer; ``{response}`` is the peer's answer.
        failure_template: block for one failed peer; ``{response}``.
        feedback_template: appended to a peer block when feedback is on; ``{feedback}``.
        summaries: the reference's solution summaries (its launcher's default: ``all``, 7 peers, beside one success
            shown whole). Unless ``off``, the student's prompt (and the question its teacher reads) asks it to end
            with a one-sentence summary in ``<summary_tag>`` tags, and the teacher context shows the summaries of
            ``summary_k`` other rollouts of the group drawn from its successes, failures or ``all``, each labelled,
            after the peers shown whole (never a peer already shown whole, nor the rollout itself). A rollout
            without a summary is represented by the start of its response (``summary_fallback_chars``).
        summary_k: summaries per context, at most (0: the student is asked for summaries but none is shown).
        summary_tag: the tag of the summary (``summary``: ``<summary>...</summary>``).
        summary_instruction: appended to the student's last user turn; ``{tag}``.
        summary_success_template, summary_failure_template: one summary in the context; ``{summary}``.
        summary_fallback_chars: characters of a response shown when it has no summary.
        self_feedback_template: the rollout's own feedback; ``{feedback}``.
        context_template: the whole user turn; ``{question}``, ``{peers}``, ``{feedback}`` (the rollout's own
            feedback, empty unless ``self_feedback``).
        feedback_only_template: the user turn of a context with the rollout's own feedback and no peers;
            ``{question}``, ``{feedback}``.
        truncation_marker: replaces the cut middle of a long peer; ``{n}`` is the number of tokens cut.
    """

    n_success: int = 2
    n_failure: int = 1
    failure_when: Literal["always", "when_no_success"] = "always"
    context: Literal["peers", "none", "random_peer", "unrelated_prompt", "swapped_labels",
                     "success_only_matched"] = "peers"
    control_match: Literal["block", "token"] = "block"
    require_success: bool = False
    dont_reprompt_on_self_success: bool = True
    remove_thinking_from_demonstration: bool = False
    max_peer_tokens: int = 256
    include_feedback: bool = False
    self_feedback: Literal["never", "always", "without_success"] = "never"
    summaries: Literal["off", "success", "failure", "all"] = "off"
    summary_k: int = 1
    summary_tag: str = "summary"
    summary_instruction: str = ("\n\nAfter your answer, sum up your approach in one sentence between <{tag}> and "
                                "</{tag}>.")
    summary_success_template: str = "Summary of another correct attempt: {summary}\n\n"
    summary_failure_template: str = "Summary of another incorrect attempt: {summary}\n\n"
    summary_fallback_chars: int = 300
    success_template: str = "Here is a correct solution from another attempt:\n{response}\n\n"
    failure_template: str = "Here is an incorrect solution from another attempt:\n{response}\n\n"
    feedback_template: str = "Feedback on that attempt: {feedback}\n\n"
    self_feedback_template: str = "The verifier's feedback on your own earlier attempt:\n{feedback}\n\n"
    context_template: str = (
        "{question}\n\n---\nOther attempts at this question, for reference:\n\n{peers}---\n"
        "{feedback}Now solve the original question above correctly, in your own words, and follow its answer format."
    )
    feedback_only_template: str = (
        "{question}\n\n---\n{feedback}"
        "Now solve the original question above correctly, in your own words, and follow its answer format."
    )
    truncation_marker: str = "\n[... {n} tokens omitted ...]\n"

    def __post_init__(self):
        _require(self.n_success >= 0 and self.n_failure >= 0, "model.peers", "n_success and n_failure must be >= 0")
        _require(self.context in PEER_CONTEXTS, "model.peers.context",
                 f"is {self.context!r}; expected one of {', '.join(PEER_CONTEXTS)}")
        _require(self.n_success + self.n_failure >= 1 or self.context == "none"
                 or (self.summaries != "off" and self.summary_k > 0), "model.peers",
                 "n_success and n_failure are both 0: a teacher context needs at least one peer "
                 "(model.peers.context: none shows the teacher the plain prompt)")
        _require(self.summaries in ("off", "success", "failure", "all"), "model.peers.summaries",
                 f"is {self.summaries!r}; expected off, success, failure or all")
        _require(self.summaries == "off" or self.summary_k == 0 or self.context == "peers", "model.peers.summaries",
                 f"shows summaries in the method's contexts; model.peers.context is {self.context!r} (the reference "
                 "turns summaries off for its controls)")
        _require(self.summary_k >= 0 and self.summary_fallback_chars >= 0, "model.peers",
                 "summary_k and summary_fallback_chars must be >= 0")
        _require(bool(re.fullmatch(r"[A-Za-z][\w-]*", self.summary_tag)), "model.peers.summary_tag",
                 f"is {self.summary_tag!r}; expected a tag name such as summary")
        for name in ("summary_success_template", "summary_failure_template"):
            _require("{summary}" in getattr(self, name), f"model.peers.{name}", "must contain {summary}")
        _require(not (self.include_feedback and self.context in LABEL_BLIND), "model.peers.include_feedback",
                 f"shows each peer's verifier feedback, which states its outcome; model.peers.context "
                 f"{self.context} is a label-blind control, whose labels must say nothing (turn one of them off)")
        _require(self.control_match in ("block", "token"), "model.peers.control_match",
                 f"is {self.control_match!r}; expected block or token")
        _require(self.self_feedback in ("never", "always", "without_success"), "model.peers.self_feedback",
                 f"is {self.self_feedback!r}; expected never, always or without_success")
        if self.self_feedback != "never":
            for name in ("context_template", "feedback_only_template"):
                _require("{feedback}" in getattr(self, name), f"model.peers.{name}",
                         "has no {feedback} field, so model.peers.self_feedback would show nothing")
        _require(self.failure_when in ("always", "when_no_success"), "model.peers.failure_when",
                 f"is {self.failure_when!r}; expected 'always' or 'when_no_success'")
        _require(self.max_peer_tokens >= 8, "model.peers.max_peer_tokens", "must be at least 8")
        for name in ("success_template", "failure_template"):
            _require("{response}" in getattr(self, name), f"model.peers.{name}", "must contain {response}")
        _require("{feedback}" in self.feedback_template, "model.peers.feedback_template", "must contain {feedback}")
        for key in ("{question}", "{peers}"):
            _require(key in self.context_template, "model.peers.context_template", f"must contain {key}")


@dataclass
class VerifierConfig:
    """What counts as a success; decided once per rollout, for training and evaluation alike.

    Attributes:
        strict: only the answer format the prompt asks for counts (``<answer>X</answer>`` for sci,
            ``\\boxed{}`` for math), as in the reference implementation; false also reads bare letters,
            "the answer is ..." and last numbers.
        success_threshold: a rollout with reward >= this is a success (peers, advantages, pass@k, the analysis).
        sandbox: the least isolation model-written code may run under (code domain): ``auto`` takes the best this
            machine allows and warns loudly below ``full``; ``full``, ``namespaces`` or ``process`` refuse to
            run with less. The level used is logged as ``train/sandbox_isolation`` (0 process .. 2 full).
    """

    strict: bool = True
    success_threshold: float = 0.5
    sandbox: Literal["auto", "full", "namespaces", "process"] = "auto"

    def __post_init__(self):
        _require(0 < self.success_threshold <= 1, "model.verifier.success_threshold", "must lie in (0, 1]")


@dataclass
class TeacherConfig:
    """Who scores the student's rollouts under the peer context.

    Attributes:
        kind: ``ema`` (a copy of the student updated after every step), ``self`` (the live student weights,
            no gradient), ``frozen`` (the initial weights), ``trust_region`` (logits ``(1 - m) * initial + m *
            student``, as the reference's ``teacher_regularization: trust-region``: a softmax of them is the
            normalised geometric mixture initial^(1 - m) * student^m), or ``external`` (another checkpoint).
        ema_rate: r in ``teacher <- (1 - r) * teacher + r * student`` (paper: 0.05).
        mix: m of ``trust_region``, the live student's share of the teacher's logits (the reference's
            ``teacher_update_rate``, 0.05 by default: the teacher stays near the initial model).
        path: hub id or local path of the external teacher; its tokenizer must match the student's.
    """

    kind: Literal["ema", "self", "frozen", "trust_region", "external"] = "ema"
    ema_rate: float = 0.05
    mix: float = 0.05
    path: Optional[str] = None

    def __post_init__(self):
        _require(self.kind in ("ema", "self", "frozen", "trust_region", "external"), "model.teacher.kind",
                 f"is {self.kind!r}; expected one of ema, self, frozen, trust_region, external")
        _require(0 < self.ema_rate <= 1, "model.teacher.ema_rate", "must lie in (0, 1]")
        _require(0 <= self.mix <= 1, "model.teacher.mix", "must lie in [0, 1]")
        _require(self.kind != "external" or bool(self.path), "model.teacher.path",
                 "is required when model.teacher.kind is 'external'")


@dataclass
class LossConfig:
    """The token-level distillation loss.

    Attributes:
        alpha: 0 = forward KL(teacher || student), 1 = reverse KL(student || teacher), between = generalized
            Jensen-Shannon with mixture (1 - alpha) * student + alpha * teacher.
        temperature: divides student and teacher logits before the softmax.
        teacher_temperature: null = ``temperature``; else divides the teacher's logits instead (below 1 sharpens
            the target: a remedy for a teacher flatter than the student, the entropy blow-up of self-distillation).
        topk: null = full vocabulary; k = the student's top-k tokens (100 reproduces the reference code).
        tail: with ``topk``, add one bucket holding the rest of the probability mass.
        is_clip: cap of the importance weight exp(logp - logp_old) when rollouts are reused.
        backend: ``auto`` (Triton kernels on CUDA, chunked PyTorch elsewhere), ``triton`` or ``torch``.
        fused_linear: apply the output projection inside the loss, chunk by chunk, so that the full logits
            never exist (top-k always goes through the logits).
        estimator: ``full``: the divergence over the whole vocabulary (or ``topk``) at every token; ``sampled_token``:
            reverse KL estimated on the sampled token alone, the teacher-minus-student log-ratio as a per-token
            advantage (the reference's ``full_logit_distillation: false``); ``label_contrast``: the same estimate
            under the peers' true labels minus under the same peers with their labels swapped, so that only what
            the labels say moves the student, not what any peer context does to the teacher (after RLCSD,
            arXiv 2606.11709; a second teacher pass). Both need ``alpha: 1`` and no ``topk``.
        tokens: ``all`` response tokens, or only the ``answer`` span the verifier read (the letter, the last
            ``\\boxed{}``, the program; a token mean over those tokens; rollouts without one get no signal): where the
            analysis finds the peers' information, on a short-answer task (README, "The positive control").
    """

    alpha: float = 0.5
    temperature: float = 1.0
    teacher_temperature: Optional[float] = None
    topk: Optional[int] = None
    tail: bool = True
    is_clip: float = 2.0
    backend: Literal["auto", "triton", "torch"] = "auto"
    fused_linear: bool = True
    estimator: Literal["full", "sampled_token", "label_contrast"] = "full"
    tokens: Literal["all", "answer"] = "all"

    def __post_init__(self):
        _require(0 <= self.alpha <= 1, "model.loss.alpha", f"is {self.alpha}; must lie in [0, 1]")
        _require(self.tokens in ("all", "answer"), "model.loss.tokens", f"is {self.tokens!r}; expected all or answer")
        _require(self.temperature > 0, "model.loss.temperature", "must be positive")
        _require(self.teacher_temperature is None or self.teacher_temperature > 0, "model.loss.teacher_temperature",
                 "must be null or positive")
        _require(self.topk is None or self.topk >= 1, "model.loss.topk", "must be null or >= 1")
        _require(self.is_clip >= 1, "model.loss.is_clip", "must be >= 1")
        _require(self.estimator in ("full", "sampled_token", "label_contrast"), "model.loss.estimator",
                 f"is {self.estimator!r}; expected full, sampled_token or label_contrast")
        _require(self.estimator == "full" or (self.alpha == 1 and self.topk is None), "model.loss.estimator",
                 f"{self.estimator} estimates reverse KL on the sampled token: it needs model.loss.alpha 1 (is "
                 f"{self.alpha}) and model.loss.topk null (is {self.topk})")
        _require(self.backend in ("auto", "triton", "torch"), "model.loss.backend",
                 f"is {self.backend!r}; expected auto, triton or torch")


@dataclass
class GRPOConfig:
    """The group-relative policy-gradient objective (method ``grpo``, or blended into a distillation method).

    Attributes:
        weight: lambda of the blend ``lambda * GRPO + (1 - lambda) * distillation`` for methods mopd, opd and
            teacher_opd (each part a token mean over its own rollouts); 0 = pure distillation.
        clip_eps: PPO clip range of the ratio exp(logp - logp_old).
        scale_rewards: advantages ``(r - mean) / (std + eps)`` over the group; false: ``r - mean``.
        std_eps: the eps added to the group's (sample) standard deviation.
        kl_coef: weight of the k3 estimate of KL(student || initial student); 0 = no reference model.
    """

    weight: float = 0.0
    clip_eps: float = 0.2
    scale_rewards: bool = True
    std_eps: float = 1e-4
    kl_coef: float = 0.0

    def __post_init__(self):
        _require(0 <= self.weight <= 1, "model.grpo.weight", f"is {self.weight}; must lie in [0, 1]")
        _require(0 < self.clip_eps < 1, "model.grpo.clip_eps", "must lie in (0, 1)")
        _require(self.std_eps > 0, "model.grpo.std_eps", "must be positive")
        _require(self.kl_coef >= 0, "model.grpo.kl_coef", "must be >= 0")


@dataclass
class PreferenceConfig:
    """The preference baselines (``model.method: dpo | simpo``), as the paper's code runs them: every pair of a
    group's rollouts with different rewards, the higher one chosen; ``z = beta * (h_chosen - h_rejected) - gamma``
    and the loss ``-(1 - eps) log sigmoid(z) - eps log sigmoid(-z)``, a mean over the step's pairs. DPO's ``h`` is the
    rollout's summed log-prob minus the initial student's (the frozen reference); SimPO's its mean log-prob, with no
    reference.

    Attributes:
        dpo_beta: DPO's beta (reference: 0.1).
        simpo_beta: SimPO's beta (reference: 2.0).
        simpo_gamma: SimPO's target margin gamma (reference: 1.0).
        label_smoothing: cDPO's eps, the share of pairs taken to be mislabelled; 0 is plain DPO / SimPO.
    """

    dpo_beta: float = 0.1
    simpo_beta: float = 2.0
    simpo_gamma: float = 1.0
    label_smoothing: float = 0.0

    def __post_init__(self):
        _require(self.dpo_beta > 0, "model.preference.dpo_beta", "must be positive")
        _require(self.simpo_beta > 0, "model.preference.simpo_beta", "must be positive")
        _require(self.simpo_gamma >= 0, "model.preference.simpo_gamma", "must be >= 0")
        _require(0 <= self.label_smoothing < 0.5, "model.preference.label_smoothing", "must lie in [0, 0.5)")


@dataclass
class OptimConfig:
    """Optimizer and the shape of one update.

    Attributes:
        lr: AdamW learning rate (paper: 1e-6 on 4-8B models).
        weight_decay: AdamW weight decay (as the reference: 0.01).
        betas: AdamW betas.
        warmup_steps: linear warm-up of the learning rate over this many optimizer updates (as the reference: 10).
        grad_clip: clip the global gradient norm to this; 0 disables clipping.
        max_tokens_per_micro_batch: computed tokens per forward/backward (rows x longest row, or the sum of the
            rows when packed); bounds memory.
        updates_per_batch: optimizer updates on each batch of rollouts (>1 reuses rollouts, with importance
            weights). A training step is one batch of rollouts whatever this is: ``trainer.max_steps``, checkpoints
            every n steps and the logged step count batches.
        packed: run teacher and student passes padding-free, micro-batches planned by real tokens: with
            flash-attention the rows of a micro-batch are one sequence with per-row positions (variable-length
            kernel); otherwise one forward per row. ``train/padded_fraction`` reports the padding either way.
    """

    lr: float = 1e-5
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.999)
    warmup_steps: int = 10
    grad_clip: float = 1.0
    max_tokens_per_micro_batch: int = 4096
    updates_per_batch: int = 1
    packed: bool = False

    def __post_init__(self):
        _require(self.lr > 0, "model.optim.lr", "must be positive")
        _require(self.max_tokens_per_micro_batch >= 16, "model.optim.max_tokens_per_micro_batch", "must be >= 16")
        _require(self.updates_per_batch >= 1, "model.optim.updates_per_batch", "must be >= 1")
        _require(self.grad_clip >= 0, "model.optim.grad_clip", "must be >= 0")
        _require(self.warmup_steps >= 0, "model.optim.warmup_steps", "must be >= 0")


# The module saves its settings in checkpoints; resuming from Python (``trainer.fit(ckpt_path=...)``) loads them
# with torch's safe unpickler, which accepts only the classes it is told about.
torch.serialization.add_safe_globals([SamplingConfig, DynamicSamplingConfig, LoRAConfig, VLLMConfig, PeerConfig,
                                      PreferenceConfig,
                                      VerifierConfig, TeacherConfig, LossConfig, GRPOConfig, OptimConfig])
