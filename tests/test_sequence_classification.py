"""Text through transformers' own classes: AutoModelForSequenceClassification with its own
head, peft SEQ_CLS adapters that peft's Auto classes load, FedSA's personalised adapters on
each node, and the model's own dropout (``model-dropout``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import AutoPeftModelForSequenceClassification
from transformers import AutoTokenizer

from lorm_flwr import wire
from lorm_flwr.config import ConfigError, RunConfig
from lorm_flwr.data.datasets import cap_per_class, hold_out_validation, load_dataset
from lorm_flwr.models.adapters import attach_lora, get_tensors, model_layout
from lorm_flwr.models.backbones import SequenceClassifier, build_classifier
from lorm_flwr.seeds import validation_split_seed
from tests.simulations import run_app

TEXT = {
    "dataset": "bbc-news",
    "num-tasks": 1,
    "rounds-per-task": 2,
    "local-epochs": 1,
    "batch-size": 8,
    "max-length": 32,
    "max-samples-per-class": 16,
    "lora-rank": 2,
    "lora-alpha": 4.0,
    "lr": 0.01,
    "seed": 1,
}


def _test_split(cfg: RunConfig):
    """The run's test texts and labels, raw (the app tokenises them itself)."""
    data = load_dataset(cfg.dataset, cfg.test_fraction, cfg.seed)
    data = cap_per_class(data, cfg.max_samples_per_class, cfg.seed)
    data = hold_out_validation(data, cfg.validation_fraction, validation_split_seed(cfg.seed))
    return data.test_x, data.test_y


def _auto_peft_predictions(folder, texts, max_length) -> np.ndarray:
    """Argmax of peft's own AutoPeftModelForSequenceClassification, with the tokenizer saved
    next to the adapter, as a user without lorm-flwr would run it."""
    model = AutoPeftModelForSequenceClassification.from_pretrained(str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=True,
                    return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        return model(**enc).logits.argmax(dim=1).numpy()


@pytest.mark.parametrize("backbone", ["tiny-roberta", "tiny-bert"])
def test_heads_are_the_models_own(backbone):
    """RoBERTa's head is dense + out_proj on <s>, BERT's one Linear on the pooler; both are
    peft modules_to_save, trained in full, and each is a head layer of the layout."""
    model = attach_lora(build_classifier(backbone, 0, 5, 0), rank=2, alpha=2.0,
                        targets=["query", "value"])  # fmt: skip
    names = [h.name for h in model_layout(model).heads]
    if backbone == "tiny-roberta":
        assert names == ["model.classifier.dense", "model.classifier.out_proj"]
    else:
        assert names == ["model.classifier"]
    assert model_layout(model).num_classes == 5
    inner = model.base_model.model
    assert isinstance(inner, SequenceClassifier)
    assert (
        type(inner.model).__name__
        == f"{backbone.split('-')[1].capitalize()}ForSequenceClassification"
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".modules_to_save.default." in n for n in trainable)


def test_lorm_text_adapter_loads_with_auto_peft_and_scores_as_results_say(federation, tmp_path):
    """LoRM on tiny RoBERTa (2 clients): the exported adapter is a SEQ_CLS adapter that
    AutoPeftModelForSequenceClassification loads from the run folder alone, and its test
    accuracy equals results.json's final accuracy. One task: plain federated learning of all
    classes, LoRM's end-of-task merge with nothing before it."""
    folder, results, _ = run_app(federation, tmp_path / "runs", 2,
                                 {**TEXT, "strategy": "lorm", "backbone": "tiny-roberta"})  # fmt: skip
    assert len(results["accuracy_matrix"]) == 1 and results["tasks"] == [[0, 1, 2, 3, 4]]
    assert results["average_forgetting"] is None  # nothing to forget with one task
    config = (folder / "adapter" / "adapter_config.json").read_text()
    assert '"task_type": "SEQ_CLS"' in config and '"classifier"' in config
    cfg = RunConfig.from_mapping(results["config"])
    texts, labels = _test_split(cfg)
    preds = _auto_peft_predictions(folder / "adapter", texts, cfg.max_length)
    last = results["task_end"][-1]
    assert last["total"] == len(labels)
    assert int((preds == labels).sum()) == last["correct"]
    assert results["final_average_accuracy"] == pytest.approx(last["correct"] / last["total"])


def test_fedsa_writes_each_clients_personalised_adapter(federation, tmp_path):
    """FedSA on tiny BERT: no global adapter; each client writes the shared A, its own B and
    head under <run folder>/clients/partition-K/adapter, loadable with peft's Auto class,
    and those adapters on the clients' own test splits give results.json's accuracy."""
    from lorm_flwr.runtime import scenario_of
    from tests.test_select_round import check_selection

    folder, results, _ = run_app(
        federation, tmp_path / "runs", 2,
        {**TEXT, "strategy": "fedsa", "backbone": "tiny-bert", "rounds-per-task": 3,
         "validation-fraction": 0.2, "select-round": "best-validation"},
    )  # fmt: skip
    check_selection(results, rounds=3)  # each client's own model on its share of validation
    assert not (folder / "adapter").exists()
    cfg = RunConfig.from_mapping(results["config"])
    texts, labels = _test_split(cfg)
    scenario = scenario_of(cfg, 2)
    correct = total = 0
    heads = []
    for pid in range(2):
        adapter = folder / "clients" / f"partition-{pid}" / "adapter"
        idx = scenario.test_shards[0][pid]
        preds = _auto_peft_predictions(adapter, texts[idx], cfg.max_length)
        correct += int((preds == labels[idx]).sum())
        total += len(idx)
        heads.append(AutoPeftModelForSequenceClassification.from_pretrained(str(adapter)))
    assert (
        correct == results["task_end"][-1]["correct"] and total == results["task_end"][-1]["total"]
    )
    # the clients' heads differ (kept local); their A factors are the shared ones
    one, two = (dict(m.named_parameters()) for m in heads)
    head_key = next(k for k in one if "modules_to_save.default" in k and k.endswith("weight"))
    a_key = next(k for k in one if "lora_A" in k)
    assert not torch.equal(one[head_key], two[head_key])
    assert torch.equal(one[a_key], two[a_key])


@pytest.mark.parametrize("name", ["../x", "/etc", "a/b", ".", "..", " x"])
def test_export_to_outside_the_output_dir_is_refused(name):
    record = wire.Instructions(task=0).to_config()
    record["export-to"] = name
    with pytest.raises(wire.PayloadError, match="not a bare folder name"):
        wire.Instructions.from_config(record)
    assert (
        wire.Instructions.from_config(
            wire.Instructions(task=0, export_to="20261207-run-2").to_config()
        ).export_to
        == "20261207-run-2"
    )


def test_model_dropout_trains_with_the_models_own_dropout_and_is_for_text_only():
    from lorm_flwr.train import TokenInputs, train_local

    with pytest.raises(ConfigError, match="model-dropout=true applies to text backbones only"):
        RunConfig.from_mapping({"model-dropout": True})
    RunConfig.from_mapping({"model-dropout": True, "dataset": "bbc-news", "backbone": "tiny-bert"})

    def trained(model_dropout: bool):
        model = attach_lora(build_classifier("tiny-bert", 0, 3, 0), rank=2, alpha=2.0,
                            targets=["query", "value"])  # fmt: skip
        ids = np.random.default_rng(0).integers(100, 1000, size=(16, 12)).astype(np.int32)
        labels = np.arange(16) % 3
        stats = train_local(
            model, ids, labels, task_classes=[0, 1, 2], inputs=TokenInputs(), epochs=1,
            batch_size=8, lr=0.01, weight_decay=0.0, device=torch.device("cpu"), seed=0,
            model_dropout=model_dropout,
        )  # fmt: skip
        assert not any(m.training for m in model.modules())  # eval mode again after training
        return stats.loss, get_tensors(model)

    (loss_off, off), (loss_on, on) = trained(False), trained(True)
    assert loss_off != loss_on  # hidden/attention dropout (0.1) changed the forward passes
    assert trained(True)[0] == loss_on  # and it is drawn from the round's seed
    assert any(not torch.equal(off[k], on[k]) for k in off)


@pytest.mark.parametrize("strategy", ["lorm", "regmean", "fedit", "fedsa-vera"])
def test_robertas_two_head_linears_travel_and_merge(strategy):
    """Two clients' real replies on tiny RoBERTa: every head Linear (dense, out_proj) sends
    its own ``W G`` and ``G`` (Gram strategies) or its tensors, and the Gram merges solve
    each head Linear's RegMean on its own inputs: ``W (sum G_i) = sum W_i G_i``."""
    from flwr.app import Context, RecordDict

    import client_app
    from lorm_flwr.math.symmetric import unpack_upper
    from lorm_flwr.registry import strategy_class
    from lorm_flwr.runtime import initial_tensors, model_of
    from lorm_flwr.server.rounds import train_exchange
    from tests.messages import ScriptedGrid

    cfg = RunConfig(strategy=strategy, dataset="bbc-news", backbone="tiny-roberta", num_tasks=1,
                    max_samples_per_class=8, max_length=16, local_epochs=1, batch_size=8,
                    lora_rank=2, lora_alpha=2.0, min_samples_per_client=2, seed=1, lr=0.01,
                    min_clients=1)  # fmt: skip
    layout = model_layout(model_of(cfg))
    server = strategy_class(strategy)(cfg, layout)
    contexts = {
        node: Context(run_id=1, node_id=node, node_config={"partition-id": node - 5,
                      "num-partitions": 2}, state=RecordDict(), run_config=cfg.to_dict())
        for node in (5, 6)
    }  # fmt: skip
    glob = server.begin_task(0, dict(initial_tensors(cfg)))
    round_in_task = 1 if strategy == "lorm" else 0  # LoRM's round 1 trains A and the head
    spec = server.reply_spec(server.instructions(round_in_task))
    script = {n: (lambda m, c=c: client_app.train(m, c).content) for n, c in contexts.items()}
    replies, merged, log, _ = train_exchange(ScriptedGrid([5, 6], [script]), server, glob,
                                             round_in_task)  # fmt: skip
    assert not log.rejected and log.replies == 2
    heads = [h.name for h in layout.heads]
    assert heads == ["model.classifier.dense", "model.classifier.out_proj"]
    if strategy in ("lorm", "regmean"):
        for name in heads:
            assert {wire.gram_key(name, wire.WG), wire.gram_key(name, wire.G)} <= set(spec.grams)
        for head in layout.heads:
            wg = replies.sums[wire.gram_key(head.name, wire.WG)].double()
            g = replies.sums[wire.gram_key(head.name, wire.G)].double()
            g = unpack_upper(g) if g.dim() == 1 and g.numel() != wg.shape[1] else g
            g = torch.diag(g) if g.dim() == 1 else g
            w = merged.tensors[head.weight_key].double()
            torch.testing.assert_close(w @ g, wg, rtol=1e-4, atol=1e-4)
    elif strategy == "fedsa-vera":  # the head stays on the clients, with B
        assert not any(k.startswith("model.classifier.") for k in spec.arrays)
    else:
        assert {h.weight_key for h in layout.heads} <= set(spec.arrays)


@pytest.mark.parametrize("strategy", ["lorm", "fedsa-rslora", "fedsa-vera"])
def test_exported_text_adapter_of_every_kind_gives_the_models_logits(strategy, tmp_path):
    """LoRA, rsLoRA and VeRA adapters (with RoBERTa's head) exported as SEQ_CLS: peft's
    AutoPeftModelForSequenceClassification and load_classifier give the trained model's
    logits exactly."""
    from lorm_flwr.models.export import export_adapter, load_classifier
    from lorm_flwr.runtime import model_of

    cfg = RunConfig(strategy=strategy, dataset="bbc-news", backbone="tiny-roberta", num_tasks=1,
                    lora_rank=4, lora_alpha=4.0)  # fmt: skip
    model = model_of(cfg)
    gen = torch.Generator().manual_seed(0)
    tensors = {
        k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in get_tensors(model).items()
    }
    export_adapter(model, tensors, tmp_path / "adapter", cfg, [[0, 1, 2, 3, 4]])
    ids = torch.randint(5, 500, (2, 9), generator=gen)
    with torch.no_grad():
        want = model(ids)
        auto = AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path / "adapter"))
        got = auto.eval()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        torch.testing.assert_close(
            load_classifier(tmp_path / "adapter")(ids), want, rtol=0, atol=1e-6
        )


def test_lora_targets_that_reach_into_the_head_are_refused():
    with pytest.raises(ValueError, match=r"also matches the head \(model.classifier.dense\)"):
        attach_lora(build_classifier("tiny-roberta", 0, 3, 0), rank=2, alpha=2.0,
                    targets=["query", "dense"])  # fmt: skip
    model = attach_lora(build_classifier("tiny-roberta", 0, 3, 0), rank=2, alpha=2.0,
                        targets=["query", "output.dense"])  # fmt: skip
    assert [h.name for h in model_layout(model).heads][-1] == "model.classifier.out_proj"
