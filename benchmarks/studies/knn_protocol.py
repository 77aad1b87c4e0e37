"""How much does the kNN protocol's feature choice decide "beats random init"?

Re-evaluates finished runs (their ``checkpoint.pt`` under ``benchmarks/results/<config>/runs/<run
id>/``, which a ``recon-aux bench`` run leaves on the machine that ran it: the repository keeps
no run folders) and the same backbone untrained (the config's seed), with weighted kNN (k=200,
T=0.1, the bench protocol) on several feature choices: conv5 globally average-pooled (the
bench's ``knn_conv5``), max-pooled, flattened (the map as the linear probe reads it), and fc7.
Prints one row per run and the difference to random init. Nothing is trained; the training set
of each run's config is the kNN bank and the full test set the queries. Every network, the
untrained one included, is read with its BatchNorm statistics recalibrated as the run's own
evaluation did (``eval.bn_recalibration_images`` clean training images), so the conv5/avg column
is the run's ``knn_conv5``.

Usage::

    RECON_AUX_DATA=../shared/data python -m benchmarks.studies.knn_protocol \\
        benchmarks/results/cifar10-cpu/runs/sela-base-seed2 \\
        benchmarks/results/cifar10-cpu/runs/aet-base-seed2 ...

The runs must share the backbone and data (they are compared with one random-init row, built
from the first run's config).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from adapters.checkpoint import load_checkpoint
from adapters.config import RunConfig
from adapters.devices import machine
from adapters.engine import RunSetup, evaluation_batchnorm, prepare_run
from adapters.evaluation import extract_features, pool_features, weighted_knn

CHOICES = {  # column name -> (layer, pooling of its map)
    "conv5/avg": ("conv5", "avg"), "conv5/max": ("conv5", "max"),
    "conv5/flatten": ("conv5", "flatten"), "conv4/flatten": ("conv4", "flatten"),
    "fc7/-": ("fc7", "flatten"),
}


def evaluate(setup: RunSetup, cfg: RunConfig, k: int, temperature: float) -> dict[str, float]:
    """One forward pass over bank and queries for all layers (in the run's evaluation BatchNorm
    scope), then kNN per feature choice."""
    layers = sorted({layer for layer, _ in CHOICES.values()})
    batch_size = cfg.data.eval_batch_size
    with evaluation_batchnorm(setup.backbone, setup.train_set, cfg, setup.size, setup.device):
        bank, queries = (extract_features(setup.backbone, setup.plain_loader(split, batch_size),
                                          layers, setup.device, progress=False)
                         for split in (setup.train_set, setup.test_set))
    return {name: weighted_knn(pool_features(bank[layer], pool), bank.targets,
                               pool_features(queries[layer], pool), queries.targets, k=k,
                               temperature=temperature, device=setup.device)["top1"]
            for name, (layer, pool) in CHOICES.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders holding checkpoint.pt")
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.1)
    args = parser.parse_args()

    rows = {}
    first = None
    for run in args.runs:
        state = load_checkpoint(run / "checkpoint.pt")  # sha256-checked, weights_only
        cfg = RunConfig.from_dict(state["config"])
        if first is None:
            first = cfg
            rows["random-init"] = evaluate(prepare_run(first), first, args.k, args.temperature)
        setup = prepare_run(cfg)  # the run's data, and its backbone to load the weights into
        setup.backbone.load_state_dict(state["backbone"])
        rows[run.name] = evaluate(setup, cfg, args.k, args.temperature)
        print(f"{run.name}: {rows[run.name]}", flush=True)

    d, b = first.data, first.backbone.to_dict()
    recal = first.eval.bn_recalibration_images
    bn = (f"BatchNorm statistics recalibrated on {recal} clean training images" if recal else
          "BatchNorm statistics as training left them (eval.bn_recalibration_images: 0)")
    print(f"\nweighted kNN k={args.k} T={args.temperature}; {d.dataset} "
          f"{d.per_class}/class bank, full test set; backbone {b}; {bn}; random init = seed "
          f"{first.train.seed} untrained; {machine()}; torch threads "
          f"{torch.get_num_threads()}\n")
    names = list(CHOICES)
    print("| run | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    base = rows["random-init"]
    for name, vals in rows.items():
        cells = [f"{vals[n]:.1f}" + ("" if name == "random-init" else
                                     f" ({vals[n] - base[n]:+.1f})") for n in names]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
