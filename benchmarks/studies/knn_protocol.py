"""How much does the kNN protocol's feature choice decide "beats random init"?

Re-evaluates finished runs (their ``checkpoint.pt`` under ``runs/bench/<config>/<run id>/``) and
the same backbone untrained (the config's seed), with weighted kNN (k=200, T=0.1, the bench
protocol) on several feature choices: conv5 globally average-pooled (the bench's ``knn_conv5``),
max-pooled, flattened (the map as the linear probe reads it), and fc7. Prints one row per run
and the difference to random init. Nothing is trained; the training set of each run's config
is the kNN bank and the full test set the queries.

Usage::

    RECON_AUX_DATA=../shared/data python -m benchmarks.studies.knn_protocol \\
        runs/bench/cifar10-cpu/sela-base-seed2 runs/bench/cifar10-cpu/aet-base-seed2 ...

The runs must share the backbone and data (they are compared with one random-init row, built
from the first run's config).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from adapters.checkpoint import load_checkpoint
from adapters.engine import Trainer, machine
from adapters.evaluation import extract_features, pool_features, weighted_knn

CHOICES = {  # column name -> (layer, pooling of its map)
    "conv5/avg": ("conv5", "avg"), "conv5/max": ("conv5", "max"),
    "conv5/flatten": ("conv5", "flatten"), "conv4/flatten": ("conv4", "flatten"),
    "fc7/-": ("fc7", "flatten"),
}


def evaluate(trainer: Trainer, k: int, temperature: float) -> dict[str, float]:
    """One forward pass over bank and queries for all layers, then kNN per feature choice."""
    layers = sorted({layer for layer, _ in CHOICES.values()})
    bank, queries = (extract_features(trainer.backbone, trainer._plain_loader(split, shard=False),
                                      layers, trainer.device, progress=False)
                     for split in (trainer.train_set, trainer.test_set))
    return {name: weighted_knn(pool_features(bank[layer], pool), bank.targets,
                               pool_features(queries[layer], pool), queries.targets, k=k,
                               temperature=temperature, device=trainer.device)["top1"]
            for name, (layer, pool) in CHOICES.items()}


def _eval_config(cfg: dict) -> dict:
    """The run's config for evaluation only: no recon head, no checkpoint writing."""
    cfg = copy.deepcopy(cfg)
    cfg["recon"] = None
    cfg["run"]["out_dir"] = None
    return cfg


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
        cfg = _eval_config(state["config"])
        if first is None:
            first = cfg
            rows["random-init"] = evaluate(Trainer(first), args.k, args.temperature)
        trainer = Trainer(cfg)
        trainer.backbone.load_state_dict(state["backbone"])
        rows[run.name] = evaluate(trainer, args.k, args.temperature)
        print(f"{run.name}: {rows[run.name]}", flush=True)

    d, b = first["data"], first["backbone"]
    print(f"\nweighted kNN k={args.k} T={args.temperature}; {d['dataset']} "
          f"{d['per_class']}/class bank, full test set; backbone {b}; random init = seed "
          f"{first['train']['seed']} untrained; {machine()}; torch threads "
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
