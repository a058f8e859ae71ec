"""Client overhead of LoRM: the statistics passes relative to local training.

Runs the client's real code path (:func:`lorm_flwr.client.round.train_round`, which
times its training and its statistics pass separately) on one client's shard of
task 0, alternating a B-round and an A-round, plus the end-of-task Gram pass
(:func:`lorm_flwr.client.round.task_grams`). Each ratio is taken within one repeat, then
the median over ``--repeats`` is reported.

- B-round pass: a no-grad forward recording ``A G A^T`` (r x r) per layer and the
  head's Gram, plus the products.
- A-round pass: the same forward recording every adapted layer's full Gram.
- End-of-task pass: once per task, full Grams on the merged model.

    python -m benchmarks.client_overhead --repeats 5 --threads 1
    python -m benchmarks.client_overhead --set gram-alpha=0
    python -m benchmarks.client_overhead --fold-ab 15
    python -m benchmarks.client_overhead --pointwise-ab 15
    python -m benchmarks.client_overhead --forward --repeats 9 --threads 1

``--forward`` also times, inside each pass and right before it, the same forward with no
Gram recorded (the adapters merged, BatchNorm folded, as the pass runs): the part of a pass
that any statistics of the trained model's layer inputs must pay.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from benchmarks.compare import _parse_sets
from lorm_flwr import wire
from lorm_flwr.client import round as client
from lorm_flwr.client.round import task_grams, train_round
from lorm_flwr.config import RunConfig
from lorm_flwr.runtime import initial_tensors, scenario_of


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--client", type=int, default=0)
    p.add_argument("--set", nargs="*", default=[])
    p.add_argument(
        "--fold-ab", type=int, default=0, metavar="N",
        help="instead, time each statistics pass with and without BatchNorm folding, alternately, N times each",
    )  # fmt: skip
    p.add_argument(
        "--pointwise-ab", type=int, default=0, metavar="N",
        help="instead, time each statistics pass with and without 1x1 convs as matrix products, N times each",
    )  # fmt: skip
    p.add_argument(
        "--forward", action="store_true",
        help="also time each pass's forward alone (no Gram recorded), right before the pass",
    )  # fmt: skip
    args = p.parse_args()
    if args.forward and (args.fold_ab or args.pointwise_ab):
        p.error("--forward: not with --fold-ab or --pointwise-ab")
    if args.repeats < 1 or args.fold_ab < 0 or args.pointwise_ab < 0:
        p.error("--repeats must be at least 1, --fold-ab and --pointwise-ab at least 0")
    if not 0 <= args.client < args.clients:
        p.error(f"--client {args.client}: one of 0..{args.clients - 1} (--clients {args.clients})")
    cfg = RunConfig.from_mapping(
        {**_parse_sets(args.set), "strategy": "lorm", "client-threads": args.threads}
    )
    if args.fold_ab:
        rewrite_ab(cfg, args, "batchnorm_folded", "BatchNorm folding", args.fold_ab)
        return
    if args.pointwise_ab:
        rewrite_ab(
            cfg, args, "pointwise_as_matmul", "1x1 convs as matrix products", args.pointwise_ab
        )
        return
    shard = scenario_of(cfg, args.clients).shards[0][args.client]
    start = initial_tensors(cfg)
    times: dict[str, list[float]] = {
        k: [] for k in ("train B", "stats B", "train A", "stats A", "end")
    }
    forwards: list[float] = []
    with _forward_timed(forwards) if args.forward else contextlib.nullcontext():
        for i in range(args.repeats + 1):  # the first repeat warms caches and is dropped
            forwards.clear()
            row = _one_repeat(cfg, args, start, seed=i)
            if args.forward and len(forwards) != 3:  # a pass that ran twice, or not at all
                raise SystemExit(f"expected 3 statistics passes a repeat, timed {len(forwards)}")
            for k, v in zip(("stats B", "stats A", "end"), forwards):
                row[k] -= v  # the extra timed forward off: the pass as it runs (its own forward in)
            if i:
                for k, v in row.items():
                    times[k].append(v)
                if args.forward:  # the B-round's pass and the A-round's (not the end-of-task one)
                    for k, v in zip(("forward B", "forward A"), forwards):
                        times.setdefault(k, []).append(v)
    med = {k: statistics.median(v) for k, v in times.items()}
    # Ratios are taken within each repeat (training and its pass ran back to back),
    # then the median over repeats: the machine's speed drifts between repeats.
    rows = list(zip(*(times[k] for k in ("train B", "stats B", "train A", "stats A", "end"))))
    ratio_b = statistics.median(sb / tb for tb, sb, _, _, _ in rows)
    ratio_a = statistics.median(sa / ta for _, _, ta, sa, _ in rows)
    per_round = statistics.median((sb + sa) / (tb + ta) for tb, sb, ta, sa, _ in rows)
    per_task = statistics.median(
        (sb + sa + 2 * e / cfg.rounds_per_task) / (tb + ta) for tb, sb, ta, sa, e in rows
    )
    print(
        f"shard of {len(shard)} samples, {cfg.local_epochs} epochs, gram-alpha={cfg.gram_alpha}, "
        f"{args.threads} thread(s), torch {torch.__version__}, medians of {args.repeats}:\n"
        f"  B-round: training {med['train B']:.3f} s, statistics {med['stats B']:.3f} s ({100 * ratio_b:.1f}%)\n"
        f"  A-round: training {med['train A']:.3f} s, statistics {med['stats A']:.3f} s ({100 * ratio_a:.1f}%)\n"
        f"  per round (B and A alternate): {100 * per_round:.1f}%\n"
        f"  end-of-task pass {med['end']:.3f} s; a task of {cfg.rounds_per_task} rounds in all: "
        f"{100 * per_task:.1f}%"
    )
    if args.forward:
        # Each forward was timed in the same repeat as its round's training.
        fb = statistics.median(f / t for f, t in zip(times["forward B"], times["train B"]))
        fa = statistics.median(f / t for f, t in zip(times["forward A"], times["train A"]))
        print(
            f"  forward alone (no Gram): B-round {statistics.median(times['forward B']):.3f} s "
            f"({100 * fb:.1f}% of its training), A-round "
            f"{statistics.median(times['forward A']):.3f} s ({100 * fa:.1f}%); timed apart "
            "from the passes above"
        )


@contextlib.contextmanager
def _forward_timed(seconds: list[float]):
    """Wrap the client's ``layer_grams``: first the same batches through the same model with
    nothing recorded (timed, appended to ``seconds``), then the pass itself. The pass's
    timer runs around both: the caller takes the forward's seconds off again."""
    from lorm_flwr.train import batches

    real = client.layer_grams

    def wrapped(model, targets, images, *, inputs, batch_size, device, **kw):
        rng = torch.get_rng_state()  # with `augment` the pass draws its own augmentations
        with torch.no_grad():
            t0 = time.perf_counter()
            for idx in batches(len(images), batch_size, shuffle=False):
                model(inputs(images[idx], device))
            seconds.append(time.perf_counter() - t0)
        torch.set_rng_state(rng)
        return real(model, targets, images, inputs=inputs, batch_size=batch_size,
                    device=device, **kw)  # fmt: skip

    client.layer_grams = wrapped
    try:
        yield
    finally:
        client.layer_grams = real


def _one_repeat(
    cfg: RunConfig, args, start: dict[str, torch.Tensor], seed: int
) -> dict[str, float]:
    """A B-round and an A-round (training, then the statistics pass), then the end-of-task pass."""
    row = {}
    for factor in ("B", "A"):
        plan = wire.Instructions(
            task=0, round_in_task=0 if factor == "B" else 1, train_a=factor == "A",
            train_b=factor == "B", train_head=True,
            grams=wire.GRAMS_LORM_B if factor == "B" else wire.GRAMS_LORM_A, seed=seed,
        )  # fmt: skip
        result = train_round(cfg, args.client, args.clients, start, plan)
        row[f"train {factor}"] = result.train_seconds
        row[f"stats {factor}"] = result.grams_seconds
    t0 = time.perf_counter()
    task_grams(
        cfg, args.client, args.clients, start, wire.Instructions(task=0, grams=wire.GRAMS_TASK)
    )
    row["end"] = time.perf_counter() - t0
    return row


def rewrite_ab(cfg: RunConfig, args, name: str, label: str, pairs: int) -> None:
    """Each statistics pass with one inference rewrite of the client on and off (``client.<name>``
    replaced by a no-op context), alternating, each pass right after its training."""
    rewrite = getattr(client, name)

    def off(model, *_):
        return contextlib.nullcontext(model)

    start = initial_tensors(cfg)
    times: dict[str, list[float]] = {}
    try:
        for i in range(pairs + 1):  # the first pair warms up and is dropped
            for state, context in (("on", rewrite), ("off", off)):
                setattr(client, name, context)
                row = _one_repeat(cfg, args, start, seed=i)
                if i:
                    for kind in ("B", "A"):
                        times.setdefault(f"{kind} {state}", []).append(row[f"stats {kind}"])
                    times.setdefault(f"end {state}", []).append(row["end"])
    finally:
        setattr(client, name, rewrite)
    print(
        f"{label}, {pairs} alternating pairs, {args.threads} thread(s) "
        "(medians; ratio = median over pairs of off / on):"
    )
    for kind, text in (("B", "B-round pass"), ("A", "A-round pass"), ("end", "end-of-task pass")):
        on, off_ = times[f"{kind} on"], times[f"{kind} off"]
        ratio = statistics.median(b / a for a, b in zip(on, off_))
        print(
            f"  {text}: on {statistics.median(on):.3f} s, off {statistics.median(off_):.3f} s, {ratio:.2f}x"
        )


if __name__ == "__main__":
    main()
