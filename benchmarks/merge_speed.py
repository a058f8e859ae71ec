"""Server merge time: our LoRM A-step against the reference formula, same tensors.

Shapes of ViT-B/16 with LoRA on qkv, proj, fc1, fc2 of 12 blocks (48 layers):
the server's A-step input is each client's upload (``A_i G_i`` and ``G_i``),
and its cost depends only on the layer's input width k (768 for qkv, proj and
fc1; 3072 for fc2), so each width is timed alternately (ours, reference, ours,
...) ``--repeats`` times on one layer's tensors, and the 48-layer total is
36 x t(768) + 12 x t(3072) from the medians. The reference is the formula as
written in the reference code: fp64 ``torch.pinverse`` of the summed Gram.

    python benchmarks/merge_speed.py --repeats 5 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lorm_flwr.math.merge import gram_sum, merge_from_sums


def reference_a_step(uploads, grams):
    """The reference code's A-step: (sum A_i G_i) pinverse(sum G_i), fp64."""
    num = sum(u.double() for u in uploads)
    den = sum(g.double() if g.dim() == 2 else torch.diag(g.double()) for g in grams)
    return num @ torch.pinverse(den)


def ours_a_step(uploads, grams):
    return merge_from_sums(gram_sum(uploads), gram_sum(grams))


def make_layer(k, clients, rank, tokens, diagonal, seed):
    """What the server receives in an A-round: per client A_i G_i (r, k) and G_i, fp32."""
    gen = torch.Generator().manual_seed(seed)
    uploads, grams = [], []
    for _ in range(clients):
        x = torch.randn(tokens, k, generator=gen)  # tokens as rows
        g = x.T @ x
        g = torch.diagonal(g).clone() if diagonal else g
        a = torch.randn(rank, k, generator=gen) / k**0.5
        grams.append(g)
        uploads.append(a * g if diagonal else a @ g)
    return uploads, grams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per client and layer")
    p.add_argument("--json", default="")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    layers = {768: 36, 3072: 12}
    report = {
        "threads": args.threads,
        "clients": args.clients,
        "rank": args.rank,
        "tokens": args.tokens,
    }
    for diagonal in (False, True):
        kind = "diagonal" if diagonal else "full"
        totals = {"ours": 0.0, "reference": 0.0}
        for k, count in layers.items():
            As, grams = make_layer(k, args.clients, args.rank, args.tokens, diagonal, seed=k)
            ours_t, ref_t, ratios = [], [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                a_ours = ours_a_step(As, grams)
                t1 = time.perf_counter()
                a_ref = reference_a_step(As, grams)
                t2 = time.perf_counter()
                ours_t.append(t1 - t0)
                ref_t.append(t2 - t1)
                ratios.append((t2 - t1) / (t1 - t0))
            rel = float((a_ours - a_ref).abs().max() / a_ref.abs().max())
            mo, mr = statistics.median(ours_t), statistics.median(ref_t)
            totals["ours"] += count * mo
            totals["reference"] += count * mr
            report[f"{kind}-k{k}"] = {
                "ours_median_s": mo, "reference_median_s": mr,
                "median_ratio": statistics.median(ratios), "max_rel_diff": rel,
            }  # fmt: skip
            print(
                f"{kind:8s} k={k:4d}: ours {mo:8.4f} s  reference {mr:8.4f} s  "
                f"speed-up x{statistics.median(ratios):7.1f}  max rel diff {rel:.2e}",
                flush=True,
            )
        report[f"{kind}-48-layers"] = totals
        print(
            f"{kind:8s} 48 layers: ours {totals['ours']:.2f} s  reference {totals['reference']:.2f} s  "
            f"x{totals['reference'] / totals['ours']:.1f}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
