"""Where to tap a Vision Transformer: its last block, or the final norm that follows it?

The measurement behind :data:`recon_aux.layers.FINAL_NORM`. A small timm ViT (32 px, patch 4,
width 96, depth 4, 3 heads, MLP 2x, class token) is trained with the objective alone
(L2 + LPIPS-alex, AdamW 1e-3, batch 128, RandomCrop(32, padding=4) + flip) on a balanced
CIFAR-10 subset, once tapping ``blocks.<last>`` (before the norm) and once ``norm`` (after),
from the same initial weights and data order for each seed. Each run is scored on held-out
test images for reconstruction (``aux.reconstruct``: mean squared error and LPIPS-alex, the
training loss's own perceptual term) and for the representation (weighted kNN, k=20, of the
class token after the final norm and of the mean patch token). The untrained network is scored
the same way. Needs timm (the ``dev`` extra); the library itself does not import it.

    python -m benchmarks.studies.vit_tap --seeds 0 1 2 --out benchmarks/results/vit-tap-cpu.txt
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import recon_aux
from adapters.data import balanced_subset, load_dataset, make_augment
from adapters.devices import machine
from adapters.evaluation.knn import weighted_knn
from recon_aux import PerceptualLoss

TAPS = ("block", "norm")


def vit(seed: int) -> torch.nn.Module:
    """The ViT of the study, its weights drawn from ``seed``; output: the class token."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3,
                             mlp_ratio=2.0, num_classes=0)


@torch.no_grad()
def features(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """(N, 96) class token and mean patch token after the final norm, in eval mode."""
    model.eval()
    out: dict[str, list[torch.Tensor]] = {"cls": [], "patch_mean": []}
    for i in range(0, len(x), 500):
        tokens = model.forward_features(x[i:i + 500])  # (B, 1 + 64, 96), after the final norm
        out["cls"].append(tokens[:, 0])
        out["patch_mean"].append(tokens[:, 1:].mean(1))
    return {k: torch.cat(v) for k, v in out.items()}


def knn_scores(model, data) -> dict[str, float]:
    bank, queries = features(model, data["bank_x"]), features(model, data["query_x"])
    return {f"knn_{k}": weighted_knn(bank[k], data["bank_y"], queries[k], data["query_y"],
                                     k=20, progress=False)["top1"] for k in bank}


def train(tap: str, seed: int, data, args) -> dict[str, float]:
    """Train the ViT of ``seed`` with the objective alone, tapping ``tap``; score it."""
    model = vit(seed)
    layer = f"blocks.{len(model.blocks) - 1}" if tap == "block" else "norm"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    aux = recon_aux.attach(model, opt, layer=layer, input_shape=(3, 32, 32))
    augment = make_augment("crop_flip", size=32)
    g = torch.Generator().manual_seed(seed)
    images = data["train_u8"]
    model.train()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        batch = augment(images[torch.randint(0, len(images), (args.batch_size,), generator=g)],
                        g)
        model(batch)
        loss = aux.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - t0
    test_x = data["recon_x"]
    recon = torch.cat([aux.reconstruct(test_x[i:i + 250]) for i in range(0, len(test_x), 250)])
    judge = PerceptualLoss(l2_weight=0, lpips_weight=1, net="alex")
    with torch.no_grad():
        lpips = sum(judge(recon[i:i + 250], test_x[i:i + 250]).item() * len(recon[i:i + 250])
                    for i in range(0, len(test_x), 250)) / len(test_x)
    result = {"l2": F.mse_loss(recon, test_x).item(), "lpips": lpips, **knn_scores(model, data),
              "seconds": seconds}
    aux.remove()
    return result


def load(args) -> dict[str, torch.Tensor]:
    train = load_dataset("cifar10", data_root=args.data_root, train=True)
    test = load_dataset("cifar10", data_root=args.data_root, train=False)
    to_float = make_augment("none", size=32)

    def pick(split, per_class: int):
        idx = balanced_subset(split.targets, per_class, 0)
        return torch.from_numpy(split.images[idx]).permute(0, 3, 1, 2), \
            torch.as_tensor(split.targets[idx], dtype=torch.long)

    train_u8, _ = pick(train, args.train_per_class)
    bank_u8, bank_y = pick(train, args.bank_per_class)
    query_u8, query_y = pick(test, args.query_per_class)
    recon_u8, _ = pick(test, args.recon_per_class)
    return {"train_u8": train_u8, "bank_x": to_float(bank_u8), "bank_y": bank_y,
            "query_x": to_float(query_u8), "query_y": query_y, "recon_x": to_float(recon_u8)}


def report(rows: dict[tuple[str, int], dict[str, float]], seeds: list[int], header: str) -> str:
    """The table: per metric and setting, the mean over seeds and each seed's value."""
    lines = [header, "", f"{'metric':<16} {'setting':<22} {'mean':>8}   per seed", ]
    metrics = [("l2", "test MSE", "{:.4f}"), ("lpips", "test LPIPS-alex", "{:.4f}"),
               ("knn_cls", "kNN class token", "{:.1f}"),
               ("knn_patch_mean", "kNN mean patch", "{:.1f}")]
    names = {"random": "untrained", "block": "tap blocks.3 (before)",
             "norm": "tap norm (after)"}
    for key, label, fmt in metrics:
        for setting in ("random", *TAPS):
            if key not in rows[(setting, seeds[0])]:
                continue
            values = [rows[(setting, s)][key] for s in seeds]
            per = ", ".join(fmt.format(v) for v in values)
            lines.append(f"{label:<16} {names[setting]:<22} "
                         f"{fmt.format(statistics.fmean(values)):>8}   ({per})")
        if key in ("lpips", "l2"):
            lower = sum(rows[("norm", s)][key] < rows[("block", s)][key] for s in seeds)
            lines.append(f"{'':<16} {'norm lower than block':<22} {lower}/{len(seeds)} seeds")
    seconds = sum(rows[(t, s)]["seconds"] for t in TAPS for s in seeds)
    lines += ["", f"training time, all runs: {seconds / 60:.1f} min"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--train-per-class", type=int, default=1000)
    p.add_argument("--bank-per-class", type=int, default=500)
    p.add_argument("--query-per-class", type=int, default=200)
    p.add_argument("--recon-per-class", type=int, default=100)
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = p.parse_args(argv)
    data = load(args)
    header = (
        "ViT tap study (python -m benchmarks.studies.vit_tap): timm ViT 32 px, patch 4, "
        "width 96, depth 4, 3 heads, MLP 2x; objective alone "
        f"(L2 + LPIPS-alex), AdamW 1e-3, batch {args.batch_size}, {args.steps} steps, "
        f"RandomCrop(32, 4) + flip, on {len(data['train_u8'])} CIFAR-10 train images.\n"
        f"Reconstruction scored on {len(data['recon_x'])} test images (aux.reconstruct); "
        f"weighted kNN (k=20, T=0.1) with a {len(data['bank_x'])}-image train bank and "
        f"{len(data['query_x'])} test queries, features after the final norm. Seeds {args.seeds}"
        f" (weights and data order; both taps start from the same weights).\n"
        f"machine: {machine()}")
    rows: dict[tuple[str, int], dict[str, float]] = {}
    for seed in args.seeds:
        rows[("random", seed)] = knn_scores(vit(seed), data)
        for tap in TAPS:
            rows[(tap, seed)] = train(tap, seed, data, args)
            print(f"seed {seed} {tap}: {rows[(tap, seed)]}", flush=True)
    text = report(rows, args.seeds, header)
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
