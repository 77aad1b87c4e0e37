"""What the examples share and is not part of the two lines: arguments, CIFAR-10 loading, a kNN
check at the end, and a picture of the reconstructions, from the harness packages of the
checkout (``adapters.data``, ``adapters.backbones``, ``adapters.evaluation``).

The training loops themselves (``lightly_simclr.py``, ``lightly_byol.py``, ``lightly_swav.py``,
``lightning_simclr.py``) follow lightly's own ``examples/pytorch`` scripts; the recon-aux lines in
them are marked ``# recon-aux``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

import torch
import torchvision.transforms as T
from lightly.transforms.utils import IMAGENET_NORMALIZE
from torch import nn
from torch.utils.data import DataLoader

from adapters.backbones import build_backbone
from adapters.data import DatasetError, ImageArrays, IndexedDataset, balanced_subset, load_dataset
from adapters.evaluation import knn_eval

#: lightly's transforms normalise with ImageNet statistics; recon-aux must be told (mean/std).
NORMALIZE = IMAGENET_NORMALIZE


def fail(message: str) -> NoReturn:
    """A usage problem found after parsing: one line on stderr, exit status 2 (as argparse's)."""
    print(f"{Path(sys.argv[0]).name}: error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(2)


def at_least_one(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--recon", action=argparse.BooleanOptionalAction, default=True,
                   help="add the recon-aux objective (--no-recon: the method alone)")
    p.add_argument("--data-root", default=None,
                   help="folder with cifar10-jpg.tar.gz or cifar-10-batches-py "
                        "(default: $RECON_AUX_DATA)")
    p.add_argument("--dataset", default="cifar10",
                   help="cifar10, cifar100, svhn, or an ImageFolder path / tar")
    p.add_argument("--download", action="store_true", help="let torchvision download the data")
    p.add_argument("--per-class", type=at_least_one, default=None,
                   help="train on this many images per class (default: all)")
    p.add_argument("--epochs", type=at_least_one, default=10)
    p.add_argument("--max-steps", type=at_least_one, default=None,
                   help="stop after this many steps")
    p.add_argument("--batch-size", type=at_least_one, default=256)
    p.add_argument("--lr", type=float, default=0.06)
    p.add_argument("--backbone", default="resnet18_cifar",
                   help="a adapters.backbones backbone: resnet18_cifar, alexnet_cifar, "
                        "vit_cifar, ...")
    p.add_argument("--width", type=float, default=None,
                   help="the backbone's width multiplier (default: the backbone's own, 1.0 for "
                        "the conv nets; vit_cifar takes none)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--knn", action=argparse.BooleanOptionalAction, default=True,
                   help="kNN accuracy (k=200, t=0.1) of the backbone's output at the end")
    p.add_argument("--pictures", default=None,
                   help="save input | reconstruction pairs of the last batch to this PNG")
    return p


def backbone(args: argparse.Namespace) -> nn.Module:
    """The ``--backbone``, with ``--width`` when one is given (a backbone that takes no width
    refuses it, naming the keywords it takes)."""
    return build_backbone(args.backbone, **({} if args.width is None else {"width": args.width}))


def load_split(args: argparse.Namespace, train: bool) -> ImageArrays:
    """The ``--dataset``'s training split (``--per-class`` images of each class) or test split; a
    data set that is missing or unusable ends the example with its one-line error."""
    try:
        arrays = load_dataset(args.dataset, args.data_root, train=train, download=args.download)
        if train and args.per_class is not None:
            arrays = arrays.subset(balanced_subset(arrays.targets, args.per_class, args.seed))
    except (DatasetError, ValueError) as exc:
        fail(str(exc))
    return arrays


def train_loader(args: argparse.Namespace, transform) -> DataLoader:
    """Shuffled training batches of ``transform(PIL image)`` (lightly's transforms give views).

    Only full batches (``drop_last``, as lightly's examples): fewer training images than
    ``--batch-size`` would train nothing, so that ends the example with a message instead.
    """
    arrays = load_split(args, train=True)
    if len(arrays) < args.batch_size:
        fail(f"--batch-size {args.batch_size} is more than the {len(arrays)} training images, "
             "and only full batches are trained: no step would run. Lower --batch-size or "
             "raise --per-class.")
    dataset = IndexedDataset(arrays, transform, as_pil=True)
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                      num_workers=args.workers, persistent_workers=args.workers > 0,
                      generator=torch.Generator().manual_seed(args.seed))


def knn_report(model: nn.Module, args: argparse.Namespace) -> float:
    """Weighted kNN top-1 (%) of ``model``'s output: train split as the bank, test split scored."""
    plain = T.Compose([T.ToTensor(), T.Normalize(**NORMALIZE)])
    splits = [DataLoader(IndexedDataset(load_split(args, train), plain, as_pil=True),
                         batch_size=args.batch_size, num_workers=args.workers)
              for train in (True, False)]
    k = min(200, len(splits[0].dataset))
    layer = model.probe_points[-1]  # the representation forward() returns
    result = knn_eval(model, splits[0], splits[1], layer, args.device, k=k, temperature=0.1,
                      progress=False)
    print(f"kNN top-1 (k={k}, t=0.1, {layer} features): {result['top1']:.2f}%")
    return float(result["top1"])


def save_pictures(aux, images: torch.Tensor, path: str | Path) -> None:
    """Save input | reconstruction pairs (first 8 images), mapped back from lightly's encoding."""
    import torchvision.utils

    x = images[:8]
    rec = aux.reconstruct(x)
    mean = torch.tensor(NORMALIZE["mean"], device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(NORMALIZE["std"], device=x.device).view(1, 3, 1, 1)
    pairs = torch.stack([x * std + mean, rec * std + mean], 1).flatten(0, 1).clamp(0, 1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torchvision.utils.save_image(pairs, str(path), nrow=4, padding=1)
    print(f"reconstructions: {path}")


def log_epoch(epoch: int, total: float, steps: int, aux) -> None:
    """One line per epoch: mean loss, and the objective's last L2 / LPIPS when it is on."""
    recon = (f", recon l2 {aux.last['l2']:.4f} lpips {aux.last['lpips']:.4f}"
             if aux is not None and aux.last else "")
    print(f"epoch {epoch:02d}  loss {total / max(1, steps):.5f}{recon}", flush=True)


def finish(model: nn.Module, aux, images: torch.Tensor | None,
           args: argparse.Namespace) -> float | None:
    """After training: the reconstruction picture (if asked) and the kNN accuracy (if asked)."""
    if aux is not None and args.pictures and images is not None:
        save_pictures(aux, images, args.pictures)
    return knn_report(model, args) if args.knn else None
