"""Generation with causal LMs: the GSM8K answer convention, the encoding of instruction
pairs, the loss on response tokens only, and real Flower simulations on the offline
arithmetic data with a tiny random-init Llama, reloaded through peft's AutoPeftModelForCausalLM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lorm_flwr.config import ConfigError, RunConfig
from lorm_flwr.data.arithmetic import arithmetic_pairs, arithmetic_tokenizer
from lorm_flwr.data.instructions import (
    PROMPT,
    decode_ids,
    encode_pairs,
    final_answer,
    is_exact_match,
    prompt_ids,
)
from lorm_flwr.generation import response_loss
from tests.simulations import run_app


@pytest.mark.parametrize(
    "text, answer",
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "72"),
        ("#### 1,234", "1234"),
        ("so -3\n#### -3", "-3"),
        ("#### 42.0", "42"),
        ("#### 0.50", "0.5"),
        ("#### 3\n#### 4", "4"),  # the last one counts
        ("The answer is 5", None),
        ("####", None),
    ],
)
def test_final_answer_follows_gsm8ks_convention(text, answer):
    assert final_answer(text) == answer


def test_exact_match_needs_both_answers_equal():
    assert is_exact_match("3+4=7\n#### 7", "#### 7")
    assert is_exact_match("#### 1,000", "#### 1000")
    assert not is_exact_match("#### 8", "#### 7")
    assert not is_exact_match("7", "#### 7")  # no final answer generated
    assert not is_exact_match("#### 7", "seven")  # no reference answer: never a match


def test_pairs_encode_prompt_below_minus_one_and_response_as_ids():
    tok = arithmetic_tokenizer()
    pairs, kinds = arithmetic_pairs(4, seed=3)
    enc = encode_pairs(pairs, tok, 128)
    assert enc.shape == (4, 128) and enc.dtype == np.int32 and set(kinds) <= {0, 1, 2}
    for row, (instruction, response) in zip(enc, pairs):
        real = row[row != -1]
        n_prompt = int((real <= -2).sum())
        assert (real[:n_prompt] <= -2).all() and (
            real[n_prompt:] >= 0
        ).all()  # prompt, then response
        assert prompt_ids(row)[0] == tok.bos_token_id
        assert tok.decode(prompt_ids(row)[1:]) == PROMPT.format(instruction=instruction)
        assert tok.decode(real[n_prompt:-1].tolist()) == response and real[-1] == tok.eos_token_id
        assert (row[len(real) :] == -1).all()
    short = encode_pairs(pairs, tok, 10)  # longer prompts keep their end and one response token
    assert (short[:, -1] >= 0).all() and ((short <= -2).sum(axis=1) == 9).all()
    assert (decode_ids(enc)[enc != -1] >= 0).all()


def test_the_loss_counts_response_tokens_only():
    gen = torch.Generator().manual_seed(0)
    encoded = torch.tensor([[-3, -7, -9, 5, 6, 2, -1], [-3, -4, 8, 2, -1, -1, -1]])
    logits = torch.randn(2, 7, 12, generator=gen)
    # positions predicting a response token: (0, 2..4) -> 5, 6, 2 and (1, 1..2) -> 8, 2
    rows, cols, targets = [0, 0, 0, 1, 1], [2, 3, 4, 1, 2], [5, 6, 2, 8, 2]
    want = F.cross_entropy(logits[rows, cols], torch.tensor(targets))
    torch.testing.assert_close(response_loss(logits, encoded), want)
    changed = logits.clone()
    changed[0, 0] += 100.0  # predicts a prompt token: must not count
    changed[1, 4] += 100.0  # predicts padding
    torch.testing.assert_close(response_loss(changed, encoded), want)


def test_generation_runs_are_one_task_of_a_causal_lm():
    with pytest.raises(ConfigError, match="num-tasks=1"):
        RunConfig.from_mapping({"dataset": "arithmetic", "backbone": "tiny-llama"})
    with pytest.raises(ConfigError, match="backbones for generation: .*tiny-llama"):
        RunConfig.from_mapping({"dataset": "arithmetic", "backbone": "minilm", "num-tasks": 1})
    with pytest.raises(ConfigError, match="model-dropout"):
        RunConfig.from_mapping({"dataset": "arithmetic", "backbone": "tiny-llama",
                                "num-tasks": 1, "model-dropout": True})  # fmt: skip
    assert RunConfig.from_mapping(
        {"dataset": "arithmetic", "backbone": "tiny-llama", "num-tasks": 1}
    ).generation


ARITHMETIC = {
    "dataset": "arithmetic",
    "backbone": "tiny-llama",
    "num-tasks": 1,
    "rounds-per-task": 2,
    "local-epochs": 1,
    "batch-size": 16,
    "lr": 0.005,
    "lora-rank": 4,
    "lora-alpha": 8.0,
    "max-length": 96,
    "max-new-tokens": 12,
    "max-samples-per-class": 24,
    "seed": 1,
}


def _auto_exact_matches(folder, cfg: RunConfig, rows: np.ndarray) -> int:
    """Greedy answers of peft's AutoPeftModelForCausalLM from the folder alone, scored."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    model = AutoPeftModelForCausalLM.from_pretrained(str(folder)).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    hits = 0
    with torch.no_grad():
        for row in rows:
            prompt = torch.tensor([prompt_ids(row)])
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                 max_new_tokens=cfg.max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
            answer = tok.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)
            hits += is_exact_match(answer, tok.decode([t for t in row if t >= 0]))
    return hits


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["lorm", "fedsa"])
def test_causal_lm_runs_report_exact_match_and_export_what_peft_loads(
    federation, tmp_path, strategy
):
    """LoRM (diagonal Grams) and FedSA on the offline arithmetic data, 2 clients: every round
    reports exact match, the untrained and final exact match are in results.json, and the
    exported adapters (LoRM's global one, FedSA's per client) give results.json's exact
    matches when peft's AutoPeftModelForCausalLM generates from the folder alone."""
    from lorm_flwr.runtime import data_of, scenario_of

    extra = {"gram-alpha": 0.0} if strategy == "lorm" else {}
    folder, results, _ = run_app(federation, tmp_path / "runs", 2,
                                 {**ARITHMETIC, "strategy": strategy, **extra})  # fmt: skip
    assert results["untrained_exact_match"] == 0.0 and results["untrained_heldout_loss"] > 0
    assert [r["exact_match"] for r in results["rounds"]] == [
        r["accuracy"] for r in results["rounds"]
    ]
    assert results["final_exact_match"] == results["final_average_accuracy"]
    cfg = RunConfig.from_mapping(results["config"])
    data = data_of(cfg)
    last = results["task_end"][-1]
    if strategy == "lorm":
        assert all(r["heldout_loss"] > 0 for r in results["rounds"])
        assert _auto_exact_matches(folder / "adapter", cfg, data.test_x) == last["correct"]
        return
    scenario = scenario_of(cfg, 2)
    hits = sum(
        _auto_exact_matches(
            folder / "clients" / f"partition-{pid}" / "adapter",
            cfg,
            data.test_x[scenario.test_shards[0][pid]],
        )
        for pid in range(2)
    )
    assert hits == last["correct"]


@pytest.mark.parametrize("strategy", ["fedit", "fedsa-rslora", "fedsa-vera"])
def test_exported_causal_lm_adapter_gives_the_trained_models_logits(strategy, tmp_path):
    """LoRA, rsLoRA and VeRA adapters of the tiny Llama, exported as CAUSAL_LM: peft's
    AutoPeftModelForCausalLM and load_classifier give the trained model's logits exactly,
    and generate."""
    from peft import AutoPeftModelForCausalLM

    from lorm_flwr.models.adapters import get_tensors
    from lorm_flwr.models.backbones import CausalLM
    from lorm_flwr.models.export import export_adapter, load_classifier
    from lorm_flwr.runtime import data_of, model_of

    cfg = RunConfig.from_mapping({**ARITHMETIC, "strategy": strategy})
    model = model_of(cfg)
    gen = torch.Generator().manual_seed(0)
    tensors = {
        k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in get_tensors(model).items()
    }
    export_adapter(model, tensors, tmp_path / "adapter", cfg, [[0, 1, 2]])
    x = torch.from_numpy(data_of(cfg).test_x[:3]).long()
    ids, mask = CausalLM.token_ids(x, 0)
    with torch.no_grad():
        want = model(x)
        auto = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter")).eval()
        torch.testing.assert_close(auto(input_ids=ids, attention_mask=mask).logits, want,
                                   rtol=0, atol=1e-5)  # fmt: skip
        torch.testing.assert_close(
            load_classifier(tmp_path / "adapter")(x), want, rtol=0, atol=1e-5
        )
        prompt = torch.tensor([prompt_ids(data_of(cfg).test_x[0])])
        out = auto.generate(input_ids=prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > prompt.shape[1]


def test_lora_on_the_embedding_is_seeded_and_refused_for_gram_strategies():
    """peft's LoRA of an embedding (A zero, B normal) is drawn from the seed, so every node
    starts alike; its factors belong to A and B like any layer's; LoRM and RegMean, whose
    merges need the Grams of a layer's inputs, refuse it before any work."""
    from lorm_flwr.models.layout import group_of
    from lorm_flwr.runtime import initial_tensors

    keys = {**ARITHMETIC, "strategy": "fedsa", "lora-targets": "embed_tokens,q_proj"}
    first = initial_tensors(RunConfig.from_mapping(keys))
    b = "model.model.embed_tokens.lora_embedding_B"
    assert group_of(b) == "B" and group_of(b.replace("_B", "_A")) == "A"
    assert torch.count_nonzero(first[b.replace("_B", "_A")]) == 0 and first[b].std() > 0.5
    again = initial_tensors.__wrapped__(RunConfig.from_mapping(keys))  # another process's draw
    assert all(torch.equal(first[k], again[k]) for k in first)
    for strategy in ("lorm", "regmean"):
        with pytest.raises(ConfigError, match="embedding .*embed_tokens.* drop it"):
            RunConfig.from_mapping({**keys, "strategy": strategy})


def test_samples_whose_response_max_length_cuts_are_left_out():
    """A cut response would leave a cut answer ('#### 1' of '#### 18') for exact match to
    score against: such samples are dropped with a warning, and a max-length that cuts
    every response stops the run."""
    from lorm_flwr.data.datasets import load_dataset
    from lorm_flwr.data.instructions import encode_data

    data = load_dataset("arithmetic", 0.2, 0)
    tok = arithmetic_tokenizer()
    full = encode_data(data, tok, 96)
    assert len(full.train_x) == len(data.train_x)
    cut = encode_data(data, tok, 66)  # the longest samples no longer fit
    assert 0 < len(cut.train_x) < len(data.train_x) and len(cut.train_x) == len(cut.train_y)
    last = (cut.train_x != -1).sum(axis=1) - 1
    assert (cut.train_x[np.arange(len(cut.train_x)), last] == tok.eos_token_id).all()
    with pytest.raises(ConfigError, match="cuts the response of every train sample"):
        encode_data(data, tok, 30)


def test_four_bit_loading_is_for_hub_causal_lms_on_cuda():
    with pytest.raises(ConfigError, match="load-in-4bit=true applies to hub causal LMs only"):
        RunConfig.from_mapping({**ARITHMETIC, "load-in-4bit": True})
    hub = {**ARITHMETIC, "backbone": "qwen2.5-0.5b", "load-in-4bit": True}
    if torch.cuda.is_available():
        RunConfig.from_mapping(hub)
    else:
        with pytest.raises(ConfigError, match="load-in-4bit=true needs CUDA"):
            RunConfig.from_mapping(hub)


def test_initial_factors_of_a_causal_lm_equal_a_fresh_adapters():
    """Generation runs compute their starting factors from the run's own model (no second
    base model): they equal those of a freshly attached adapter."""
    from lorm_flwr.models.adapters import attach_lora, get_tensors
    from lorm_flwr.models.backbones import build_classifier
    from lorm_flwr.runtime import initial_tensors, lora_targets

    cfg = RunConfig.from_mapping(
        {**ARITHMETIC, "strategy": "fedsa", "lora-targets": "embed_tokens,q_proj,lm_head"}
    )
    fresh = attach_lora(build_classifier("tiny-llama", 0, 3, cfg.seed), rank=cfg.lora_rank,
                        alpha=cfg.lora_alpha, targets=lora_targets(cfg), seed=cfg.seed)  # fmt: skip
    want = get_tensors(fresh)
    got = initial_tensors(cfg)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("split", ["train", "", "../test", "TEST"])
def test_an_evaluation_split_the_client_does_not_know_is_refused(split):
    from lorm_flwr import wire

    record = wire.Instructions(task=0).to_config()
    record["split"] = split
    with pytest.raises(wire.PayloadError, match="neither test nor validation"):
        wire.Instructions.from_config(record)
