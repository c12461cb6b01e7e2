"""A colocated vLLM engine that draws the group's rollouts (``model.sampling.backend: vllm``).

The engine lives in the training process (vLLM's offline ``LLM``, in-process: weights can be handed over as
tensors, without files or a second copy in another process). It is created on first use from the student's
checkpoint folder and then fed the student's weights once per training step, evaluation batch or analysis:

- only layers whose parameters the optimizer stepped are sent (``WeightTracker``), one parameter at a time, so
  a sharded student is gathered piece by piece, never whole;
- the LM head is re-processed after every sync when the embeddings are tied: vLLM's CPU path keeps a pre-packed
  copy of it that an in-place reload leaves stale (log-probs were measured off by up to 0.17 without this);
- after a sync that sent weights, and every ``probe_every`` syncs in any case, the engine scores a fixed probe
  sequence and the mean absolute gap to the trainer's log-probs is logged (``train/engine_sync_gap``): it must
  sit at the engine's numeric precision, or the weights are stale.

Every rollout is its own request with its own seed, so a prompt draws the same rollouts whatever batch or rank
it lands in (the same property the ``hf`` backend has; the two backends draw different tokens for one seed).
The engine returns the sampled tokens' log-probabilities under the unmodified distribution (temperature 1): their
gap to the trainer's is the off-policy error, logged (``train/engine_logp_gap``). ``logp_old`` is the trainer's
own at the first update (``update.py``); with ``model.vllm.importance_sampling`` the ratio of the two weights
every method's per-token loss (truncated or masked importance sampling, ``objectives.py``).
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple

import torch

from .config import VLLMConfig
from .lora import is_lora, merged_state_dict
from .rollouts import Rollouts
from .sharding import full_tensor, reshard

log = logging.getLogger(__name__)

# A short fixed conversation the engine and the trainer both score after each sync.
PROBE = [{"role": "user", "content": "Name three prime numbers and say why each is prime."},
         {"role": "assistant", "content": "Two, three and five: each has no divisor other than one and itself."}]
INSTALL_HINT = ("pip install -e '.[vllm]' on a CUDA machine, or bash scripts/install_vllm_cpu.sh on a CPU one "
                "(see the README)")


def layer_key(name: str) -> str:
    """The unit a parameter is synced with: its decoder layer (``model.layers.3``) or else its own module."""
    match = re.match(r"(.*?\.(?:layers|h|blocks)\.\d+)\.", name)
    return match.group(1) if match else name.rpartition(".")[0]


class WeightTracker:
    """Which parameters of the student the engine has not received since they last changed.

    The optimizer says what it stepped: after each step, every parameter that had a gradient (a skipped step has
    none). Nothing else changes the student in place during training but loading a checkpoint, which marks every
    parameter. Version counters are not used: foreach and fused optimizer steps on sharded (DTensor) parameters,
    and fused ones on plain CPU tensors, do not bump them.
    """

    def __init__(self):
        self.stale: Optional[Set[str]] = None  # names not yet sent since they changed; None: all (nothing sent)

    def follow(self, optimizer: torch.optim.Optimizer, student: torch.nn.Module) -> None:
        """Mark what each step of ``optimizer`` updates in ``student``."""
        names = {id(p): name for name, p in student.named_parameters()}

        def stepped(optimizer, args, kwargs) -> None:
            if self.stale is not None:
                self.stale.update(names[id(p)] for group in optimizer.param_groups for p in group["params"]
                                  if p.grad is not None and id(p) in names)

        optimizer.register_step_post_hook(stepped)

    def mark_all(self) -> None:
        self.stale = None

    def changed_layers(self, student: torch.nn.Module) -> List[str]:
        names = (name for name, _ in student.named_parameters()) if self.stale is None else self.stale
        return sorted({layer_key(name) for name in names})

    def weights(self, student: torch.nn.Module, layers: Sequence[str]) -> Iterator[Tuple[str, torch.Tensor]]:
        """The named parameters of ``layers``, gathered one at a time, recorded as sent. A LoRA student's are its
        base weights with its adapter merged in, under the checkpoint's names, gathered one layer at a time."""
        if self.stale is None:
            self.stale = {name for name, _ in student.named_parameters()}
        wanted = set(layers)
        lora = is_lora(student)
        for layer, names in itertools.groupby(student.named_parameters(), key=lambda item: layer_key(item[0])):
            if layer not in wanted:
                continue
            if not lora:
                for name, param in names:
                    self.stale.discard(name)
                    yield name, full_tensor(param.detach())
                continue
            gathered = {name: full_tensor(param.detach()) for name, param in names}
            self.stale.difference_update(gathered)
            yield from merged_state_dict(student, gathered).items()  # the engine holds plain weights


def _reload_in_worker(worker, weights: Iterator[Tuple[str, torch.Tensor]], tied_head: bool) -> None:
    """Runs inside vLLM's worker (in this process): load the weights in place, refresh the tied LM head."""
    worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
    if tied_head:
        head = worker.model_runner.model.lm_head
        head.quant_method.process_weights_after_loading(head)


class VLLMEngine:
    """Samples groups of rollouts with vLLM; :meth:`sync` hands it the student's current weights."""

    def __init__(self, model_path: str, tokenizer, config: VLLMConfig, seed: int, stop_token_ids: Sequence[int],
                 tracker: Optional[WeightTracker] = None):
        self.model_path, self.tokenizer, self.config, self.seed = model_path, tokenizer, config, seed
        self.stop_token_ids = list(stop_token_ids)
        self.tracker = tracker or WeightTracker()
        self.syncs_since_probe = 0
        self._llm = None
        self.sleeping = False

    @property
    def llm(self):
        if self._llm is None:
            self._llm = self._start()
        return self._llm

    def _start(self):
        try:
            from vllm import LLM
        except ImportError as error:
            raise ImportError(f"model.sampling.backend is 'vllm' but vllm cannot be imported ({error}); "
                              f"{INSTALL_HINT}") from error
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: weights pass as tensors
        if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
            raise RuntimeError("VLLM_ENABLE_V1_MULTIPROCESSING must be 0 (or unset) for the colocated engine: "
                               "weights are handed to it in-process")
        cuda = torch.cuda.is_available()
        kv_gb = self.config.kv_cache_gb if self.config.kv_cache_gb is not None or cuda else 1.0
        options = dict(model=self.model_path, dtype=self.config.dtype, seed=self.seed,
                       enforce_eager=self.config.enforce_eager, max_model_len=self.config.max_model_len)
        if kv_gb is not None:
            options["kv_cache_memory_bytes"] = int(kv_gb * (1 << 30))
        if cuda:
            options.update(gpu_memory_utilization=self.config.gpu_memory_utilization,
                           enable_sleep_mode=self.config.sleep)
            if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
                # one engine per rank on the rank's own GPU, in the ranks the launcher made (not run by us)
                options["distributed_executor_backend"] = "external_launcher"
        log.info("starting the vLLM rollout engine: %s", options)
        return LLM(**options)

    # -- weights --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sync(self, student: torch.nn.Module) -> Dict[str, float]:
        """Send the layers that changed since the last sync; return what was sent and, after a sync that sent
        weights and every ``probe_every`` syncs in any case, the probe's gap."""
        reshard(student)
        layers = self.tracker.changed_layers(student)
        sent = {"layers": float(len(layers)), "parameters": 0.0}
        self.syncs_since_probe += 1
        if layers:
            self._wake(["weights"])
            tied = bool(getattr(student.config, "tie_word_embeddings", False))
            wanted = set(layers)
            sent["parameters"] = float(sum(1 for name, _ in student.named_parameters() if layer_key(name) in wanted))
            self.llm.collective_rpc(_reload_in_worker, args=(self.tracker.weights(student, layers), tied))
            self.llm.reset_prefix_cache()
        scheduled = self.config.probe_every and self.syncs_since_probe >= self.config.probe_every
        if self.config.check_sync and (layers or scheduled):
            self.syncs_since_probe = 0
            sent["gap"] = self.probe_gap(student)
            if sent["gap"] > self.config.sync_tolerance:
                log.warning("vLLM engine log-probs differ from the trainer's by %.3g nats per token on the probe "
                            "after a weight sync (tolerance %.3g): the engine may hold stale weights",
                            sent["gap"], self.config.sync_tolerance)
        return sent

    def probe_gap(self, student: torch.nn.Module) -> float:
        """Mean |engine - trainer| log-prob over the tokens of a fixed conversation."""
        ids = list(self.tokenizer.apply_chat_template(PROBE, tokenize=True, return_dict=False))
        engine = self.prompt_logprobs(ids)
        device = next(student.parameters()).device
        was_training = student.training
        student.eval()
        try:
            logits = student(input_ids=torch.tensor([ids], device=device)).logits[0, :-1].float()
        finally:
            student.train(was_training)
        trainer = logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:], device=device)[:, None])[:, 0]
        return float((engine.to(device) - trainer).abs().mean())

    def prompt_logprobs(self, ids: List[int]) -> torch.Tensor:
        """The engine's log-prob of every token of ``ids`` after the first."""
        from vllm import SamplingParams

        self._wake()
        output = self.llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0,
                                                                               detokenize=False), use_tqdm=False)[0]
        return torch.tensor([entry[token].logprob for token, entry in zip(ids[1:], output.prompt_logprobs[1:])])

    # -- sampling -------------------------------------------------------------------------------------------
    def sample(self, prompt_ids: List[List[int]], group_size: int, seeds: List[List[int]], max_new_tokens: int,
               temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0) -> Rollouts:
        """Draw ``group_size`` rollouts per prompt, rollout ``k`` of prompt ``p`` seeded by ``seeds[p][k]``."""
        from vllm import SamplingParams

        self._wake()
        rows = [ids for ids in prompt_ids for _ in range(group_size)]
        common = dict(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, logprobs=0,
                      stop_token_ids=self.stop_token_ids, detokenize=False, skip_special_tokens=True)
        params = [SamplingParams(seed=None if temperature == 0 else s, **common) for group in seeds for s in group]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in rows], params, use_tqdm=False)
        self._sleep()
        responses, finished, logp = [], [], []
        for output in outputs:
            sample = output.outputs[0]
            tokens = list(sample.token_ids)
            responses.append(tokens)
            finished.append(sample.finish_reason == "stop")
            logp.append([entry[token].logprob for token, entry in zip(tokens, sample.logprobs)])
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        groups = [p for p in range(len(prompt_ids)) for _ in range(group_size)]
        return Rollouts(groups, rows, responses, texts, finished, sample_logp=logp)

    # -- memory on a GPU: the engine sleeps while the trainer works ------------------------------------------
    def _sleep(self) -> None:
        if self.config.sleep and torch.cuda.is_available():
            self.llm.sleep(level=1)  # weights to host memory (kept for partial syncs), KV cache freed
            self.sleeping = True

    def _wake(self, tags: Optional[List[str]] = None) -> None:
        if self.sleeping:
            self.llm.wake_up(tags)
            self.sleeping = tags is not None and "kv_cache" not in tags

