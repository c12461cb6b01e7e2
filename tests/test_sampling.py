"""The sampler: counter-based noise draws from softmax(logits / T) after top-k / top-p, and the compiled path
(static KV cache, compiled decoding step) draws what the eager path draws, batch-independently, without
recompiling within a bucket."""

import math

import pytest
import torch

from mopd_lightning.config import ConfigError, LoRAConfig, SamplingConfig
from mopd_lightning.models import load_causal_lm, load_tokenizer
from mopd_lightning.sampling import (SHORTEST_PROMPT_BUCKET, bucket, filter_scores, gumbel_noise, next_token_scores, row_keys,
                                     sample_groups, uniform)

LOGITS = torch.tensor([2.0, 1.5, 1.2, 0.3, 0.0, -0.4, -1.0, float("-inf"), -2.5, 0.9, 0.1, -0.2])


def reference_probs(logits, temperature, top_k, top_p):
    """softmax(logits / T) after top-k, then the smallest set reaching top_p of what remains, in float64 by sorting."""
    scores = logits.double() / temperature
    order = torch.argsort(scores, descending=True)
    keep = torch.zeros_like(scores, dtype=torch.bool)
    kept = order[:top_k] if top_k else order
    probs = scores[kept].softmax(-1)
    mass = 0.0
    for token, p in zip(kept.tolist(), probs.tolist()):
        if mass >= top_p:
            break
        keep[token] = True
        mass += p
    return torch.where(keep, scores, torch.tensor(float("-inf"), dtype=torch.float64)).softmax(-1)


def chi_square_p_value(counts, probs):
    """P(chi2 >= observed) over the tokens with probability > 0; none of the others may have been drawn."""
    support = probs > 0
    assert counts[~support].sum() == 0, "a token outside the filtered support was drawn"
    expected = probs[support] * counts.sum()
    statistic = ((counts[support] - expected) ** 2 / expected).sum()
    df = int(support.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), statistic / 2))


def draws(logits, rows, step, temperature, top_k, top_p, first_seed=0):
    seeds = torch.arange(first_seed, first_seed + rows, dtype=torch.int64) * 7919 + 12345
    scores, _ = next_token_scores(logits.expand(rows, -1).clone(), row_keys(seeds, step), temperature, top_k, top_p)
    return scores.argmax(-1)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.8),
                                                     (0.8, 6, 0.7), (1.0, 3, 0.95)])
def test_counter_noise_draws_from_the_filtered_softmax(temperature, top_k, top_p):
    """One draw per seed, 40,000 seeds: the token frequencies fit the float64 reference (chi-square), and nothing
    outside top-k / top-p (or at -inf) is ever drawn."""
    probs = reference_probs(LOGITS, temperature, top_k, top_p)
    tokens = draws(LOGITS, 40_000, 3, temperature, top_k, top_p)
    counts = torch.bincount(tokens, minlength=len(LOGITS)).double()
    assert chi_square_p_value(counts, probs) > 1e-3


def test_a_seeds_draws_at_different_positions_are_independent():
    """The same seeds at positions 0 and 1: the pairs of tokens fit the product of the two distributions."""
    probs = reference_probs(LOGITS, 1.0, 4, 1.0)
    first, second = draws(LOGITS, 40_000, 0, 1.0, 4, 1.0), draws(LOGITS, 40_000, 1, 1.0, 4, 1.0)
    pairs = torch.bincount(first * len(LOGITS) + second, minlength=len(LOGITS) ** 2).double()
    assert chi_square_p_value(pairs, torch.outer(probs, probs).flatten()) > 1e-3
    assert (first != second).double().mean() > 0.5


def test_the_noise_is_finite_at_the_extreme_hashes():
    """The largest hash must not round to a uniform of 1 (infinite noise; NaN on a token filtered to -inf)."""
    extremes = uniform(torch.tensor([0, 1, 2**32 - 2, 2**32 - 1]))
    assert (extremes > 0).all() and (extremes < 1).all()
    assert torch.isfinite(-torch.log(-torch.log(extremes))).all()
    noise = gumbel_noise(torch.arange(500, dtype=torch.int64) * 977, 4000)
    assert torch.isfinite(noise).all() and abs(float(noise.mean()) - 0.5772) < 0.01  # Euler's constant


def test_the_sampling_test_sees_a_wrong_distribution():
    """Positive control: draws at temperature 1 do not pass for temperature 0.8's distribution."""
    tokens = draws(LOGITS, 40_000, 3, 1.0, 0, 1.0)
    counts = torch.bincount(tokens, minlength=len(LOGITS)).double()
    assert chi_square_p_value(counts, reference_probs(LOGITS, 0.8, 0, 1.0)) < 1e-6


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (7, 1.0), (7, 0.9), (50, 0.5), (1000, 0.99), (1, 1.0)])
def test_filter_keeps_the_sorted_references_support(top_k, top_p):
    """The nucleus found among the top-k scores (no full sort) keeps the tokens the sorted float64 reference keeps,
    on rows of a vocabulary of 317 with -inf entries."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 317, generator=generator) * 3
    logits[:, ::29] = float("-inf")
    kept = filter_scores(logits, top_k, top_p) > float("-inf")
    for row in range(logits.shape[0]):
        expected = reference_probs(logits[row], 1.0, min(top_k, 317), top_p) > 0
        assert torch.equal(kept[row], expected)


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model):
    model, tokenizer = load_causal_lm(tiny_model), load_tokenizer(tiny_model)
    # frequent tokens of the random model made stop tokens, so that some rollouts stop early and some do not
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, 201, 62]
    return model, tokenizer


def prompts(tokenizer, count, extra=""):
    return [tokenizer.apply_chat_template([{"role": "user", "content": f"Question {i}{extra}: {'x ' * i}"}],
                                          add_generation_prompt=True, tokenize=True, return_dict=False)
            for i in range(count)]


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 20, 0.9), (1.0, 0, 0.8), (0.0, 0, 1.0)])
def test_the_compiled_path_draws_the_eager_paths_rollouts(model_and_tokenizer, temperature, top_k, top_p):
    """Same seeds, same rollouts, stop tokens and entropies, greedy included (dynamo traces the real graph; the
    eager backend keeps the test fast)."""
    model, tokenizer = model_and_tokenizer
    batch = prompts(tokenizer, 3)
    seeds = [[100 * p + k for k in range(4)] for p in range(3)]
    eager = sample_groups(model, tokenizer, batch, 4, seeds, 24, temperature, top_p, top_k)
    compiled = sample_groups(model, tokenizer, batch, 4, seeds, 24, temperature, top_p, top_k, compiled="eager")
    assert compiled.response_ids == eager.response_ids
    assert compiled.finished == eager.finished
    if temperature:
        assert 0 < sum(eager.finished) < len(eager)  # the stop tokens were exercised
    assert compiled.entropy == pytest.approx(eager.entropy, rel=1e-4)
    assert compiled.prompt_ids == eager.prompt_ids and len(compiled) == 12  # the bucket's spare rows dropped


def test_a_compiled_rollout_does_not_depend_on_its_batch(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    batch = prompts(tokenizer, 3)
    seeds = [[100 * p + k for k in range(4)] for p in range(3)]
    together = sample_groups(model, tokenizer, batch, 4, seeds, 16, compiled="eager")
    alone = sample_groups(model, tokenizer, batch[2:], 4, seeds[2:], 16, compiled="eager")
    assert together.response_ids[8:] == alone.response_ids


def test_the_compiled_step_is_not_recompiled_within_a_bucket(model_and_tokenizer):
    """After one call, prompts of other lengths in the same length bucket and another number of rows in the same
    row bucket reuse the compiled decoding step and sampler."""
    model, tokenizer = model_and_tokenizer
    first, other = prompts(tokenizer, 2), prompts(tokenizer, 1, extra=" with a longer question" * 2)
    assert max(map(len, first)) != max(map(len, other)) and max(map(len, first + other)) <= SHORTEST_PROMPT_BUCKET
    sample_groups(model, tokenizer, first, 4, [[1, 2, 3, 4], [5, 6, 7, 8]], 8, compiled="eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        sample_groups(model, tokenizer, other, 4, [[9, 10, 11, 12]], 8, compiled="eager")
        sample_groups(model, tokenizer, first + other, 2, [[1, 2], [3, 4], [5, 6]], 8, compiled="eager")


def test_buckets_are_powers_of_two():
    assert [bucket(n, 8) for n in (1, 8, 9, 16, 17, 64, 65)] == [8, 8, 16, 16, 32, 64, 128]
    assert [bucket(n, 64) for n in (0, 30, 64, 65, 200, 257)] == [64, 64, 64, 128, 256, 512]


def test_compile_is_refused_with_the_vllm_backend_and_a_sharded_student(tiny_model):
    from test_step import make

    with pytest.raises(ConfigError, match="model.sampling.compile"):
        SamplingConfig(backend="vllm", compile=True)
    module = make(tiny_model, sampling=SamplingConfig(compile=True))
    module._device_mesh = object()  # as ModelParallelStrategy (FSDP2) sets it
    with pytest.raises(ConfigError, match="model.sampling.compile.*FSDP"):
        module.configure_model()


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("method", ["mopd", "grpo"])
def test_a_step_with_compiled_sampling_trains_as_an_eager_one(tiny_model, monkeypatch, lora, method):
    """Compiled sampling where it meets LoRA (an adapter switched around the compiled step) and the methods: the
    same rollouts, so the same update as eager sampling."""
    import mopd_lightning.module as module_file
    from test_step import make, run, snapshot

    monkeypatch.setattr(module_file, "COMPILE_BACKEND", "eager")
    trained = []
    for compiled in (False, True):
        module = make(tiny_model, method=method, lora=LoRAConfig(enabled=lora),
                      sampling=SamplingConfig(group_size=4, max_new_tokens=12, compile=compiled))
        trainer = run(module, steps=2)
        assert trainer.callback_metrics["train/grad_norm"] > 0  # the steps had something to learn
        trained.append(snapshot(module.student))
    for name, value in trained[0].items():
        torch.testing.assert_close(trained[1][name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_inductor_compiled_sampling_draws_the_eager_rollouts(model_and_tokenizer):
    """The real fast path on the CPU: inductor compiles the decoding step and the sampler (about a minute)."""
    model, tokenizer = model_and_tokenizer
    batch = prompts(tokenizer, 2)
    seeds = [[7, 8, 9, 10], [11, 12, 13, 14]]
    eager = sample_groups(model, tokenizer, batch, 4, seeds, 16, 0.8, 0.9, 30)
    compiled = sample_groups(model, tokenizer, batch, 4, seeds, 16, 0.8, 0.9, 30, compiled="inductor")
    assert compiled.response_ids == eager.response_ids
    assert compiled.entropy == pytest.approx(eager.entropy, rel=1e-4)
    assert not math.isnan(sum(compiled.entropy))
