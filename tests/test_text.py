"""Text: tokenisation once per data set, padding kept out of Grams, text/image mismatch caught."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorm_flwr.client.gram import layer_grams
from lorm_flwr.config import ConfigError, RunConfig
from lorm_flwr.data.datasets import cap_per_class, load_dataset
from lorm_flwr.data.text import PAD, encode_texts
from lorm_flwr.models.adapters import adapter_layout, attach_lora, head_layers, head_module_of_layer
from lorm_flwr.models.backbones import BACKBONES, build_classifier, load_tokenizer
from lorm_flwr.train import TokenInputs

TEXTS = np.array(
    ["Shares rose.", "The minister said the budget would be cut next year.", "Goal!"], dtype=object
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(BACKBONES["minilm"].weights())


def test_encoding_marks_padding_and_batches_drop_empty_columns(tokenizer):
    ids = encode_texts(TEXTS, tokenizer, max_length=24)
    assert ids.shape == (3, 24) and ids.dtype == np.int32
    lengths = (ids >= 0).sum(axis=1)
    assert lengths[1] > lengths[0] > 0 and (ids[0, lengths[0] :] == PAD).all()
    batch = TokenInputs()(ids[[0, 2]], torch.device("cpu"))
    assert batch.shape == (2, max(lengths[0], lengths[2]))  # trailing all-padding columns dropped
    pairs = np.array([["Is it raining?", "It is sunny."]], dtype=object)
    assert (encode_texts(pairs, tokenizer, 16) >= 0).sum() > (
        encode_texts(pairs[:, 0], tokenizer, 16) >= 0
    ).sum()


def test_padding_tokens_never_enter_the_grams(tokenizer):
    """Grams of a padded batch equal the sum of each text's Grams computed alone (no padding)."""
    torch.manual_seed(0)
    model = attach_lora(
        build_classifier("minilm", 0, 5, 0), rank=2, alpha=2.0, targets=["query", "value"]
    )
    model.eval()
    layers = adapter_layout(model)
    targets = {
        ly.name: (model.get_submodule("base_model.model." + ly.name), False) for ly in layers[:2]
    }
    heads = head_layers(model)
    targets.update({h.name: (head_module_of_layer(model, h), False) for h in heads})
    alphas = {n: 1.0 for n in targets}
    ids = encode_texts(TEXTS, tokenizer, max_length=24)
    kw = {
        "inputs": TokenInputs(),
        "device": torch.device("cpu"),
        "alphas": alphas,
        "unmasked": frozenset(h.name for h in heads),
    }
    together, n = layer_grams(model, targets, ids, batch_size=3, **kw)
    alone = [layer_grams(model, targets, ids[i : i + 1], batch_size=1, **kw)[0] for i in range(3)]
    assert n == 3
    for name in targets:
        expected = sum(g[name] for g in alone)
        torch.testing.assert_close(together[name], expected, rtol=1e-4, atol=1e-3)
    # and the padded positions would have changed them: the unmasked sum differs
    unmasked, _ = layer_grams(
        model, targets, ids, batch_size=3, **{**kw, "unmasked": frozenset(targets)}
    )
    first = layers[0].name
    assert not torch.allclose(unmasked[first], together[first], rtol=1e-3)


def test_text_data_needs_a_text_backbone():
    with pytest.raises(ConfigError, match="is text but backbone 'efficientnet-lite0'"):
        RunConfig.from_mapping({"dataset": "bbc-news"})
    with pytest.raises(ConfigError, match="backbones for image"):
        RunConfig.from_mapping({"dataset": "mnist", "backbone": "minilm"})
    RunConfig.from_mapping({"dataset": "bbc-news", "backbone": "minilm", "num-tasks": 5})


def test_bbc_news_is_bundled_and_capped_per_class():
    data = load_dataset("bbc-news", 0.2, 0)
    assert data.class_names == ("business", "entertainment", "politics", "sports", "tech")
    assert len(data.train_y) + len(data.test_y) == 2225
    small = cap_per_class(data, 7, 0)
    assert np.bincount(small.train_y).tolist() == [7] * 5
    assert np.bincount(small.test_y).tolist() == [7] * 5


@pytest.mark.parametrize("strategy", ["ffa", "regmean", "fedsa-rslora", "fedsa-vera"])
def test_every_strategy_client_reply_on_text_is_what_its_server_accepts(strategy):
    """The client/server contract on MiniLM + BBC News for the strategies the simulation tests
    run on images only: each round kind's reply has exactly the keys, shapes and statistics
    the strategy's server expects, and passes its checks."""
    from flwr.app import Context, RecordDict

    import client_app
    from lorm_flwr.models.adapters import group_of, model_layout
    from lorm_flwr.registry import strategy_class
    from lorm_flwr.runtime import initial_tensors, model_of
    from lorm_flwr.server.rounds import train_exchange
    from tests.messages import ScriptedGrid

    cfg = RunConfig(strategy=strategy, dataset="bbc-news", backbone="minilm", num_tasks=1,
                    max_samples_per_class=6, max_length=16, local_epochs=1, batch_size=8,
                    lora_rank=2, lora_alpha=2.0, min_samples_per_client=2, seed=1,
                    min_clients=1)  # fmt: skip
    server = strategy_class(strategy)(cfg, model_layout(model_of(cfg)))
    ctx = Context(run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": 2},
                  state=RecordDict(), run_config=cfg.to_dict())  # fmt: skip
    glob = server.begin_task(0, dict(initial_tensors(cfg)))
    for round_in_task in range(2):
        spec = server.reply_spec(server.instructions(round_in_task))
        grid = ScriptedGrid([5], [{5: lambda m: client_app.train(m, ctx).content}])
        replies, merged, log, _ = train_exchange(grid, server, glob, round_in_task)
        assert not log.rejected and log.replies == 1
        (reply,) = replies
        assert set(reply.arrays) == set(spec.arrays or {})
        assert set(replies.sums) == set(spec.grams or {})  # summed as they arrived
        assert {group_of(k) for k in reply.arrays}.isdisjoint(server.local_groups)
        glob = merged.tensors
