"""Which ``resize_to`` serves CIFAR's 32x32 images best for the LPIPS term?

At 32x32, LPIPS-AlexNet's conv3-5 maps are 1x1 (its conv1 has stride 4), so most of its layers
see almost no spatial structure; upsampling before LPIPS (``resize_to``) restores it at a cost.
This script trains the default reconstruction head, on a frozen random AlexNet-CIFAR encoder
(width 0.5), on real CIFAR-10 training images with L2 + LPIPS-alex at each ``resize_to``, then
scores held-out test reconstructions with metrics the head was NOT trained on (PSNR, and
LPIPS-VGG at 64x64) and times the loss. Same seed, data order and steps for every setting.

    python -m benchmarks.studies.lpips_resize --sizes none 64 128 --steps 300
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import torch
import torch.nn.functional as F

import recon_aux
from adapters.backbones import AlexNetCIFAR
from adapters.data import balanced_subset, load_dataset
from recon_aux import PerceptualLoss


def to_float(arr) -> torch.Tensor:
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255


def run(size: int | None, train_x, test_x, args) -> dict[str, float]:
    torch.manual_seed(args.seed)
    encoder = AlexNetCIFAR(width=0.5).requires_grad_(False)  # frozen: the head trains alone
    aux = recon_aux.attach(encoder, input_shape=(3, 32, 32), resize_to=size)
    opt = torch.optim.Adam(aux.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(args.seed)
    t_loss = 0.0
    for _ in range(args.steps):
        batch = train_x[torch.randint(0, len(train_x), (args.batch_size,), generator=g)]
        encoder(batch)
        t0 = time.perf_counter()
        loss = aux.loss(batch)
        opt.zero_grad()
        loss.backward()
        t_loss += time.perf_counter() - t0
        opt.step()
    recon = torch.cat([aux.reconstruct(test_x[i:i + 250]) for i in range(0, len(test_x), 250)])
    mse = F.mse_loss(recon, test_x).item()
    judge = PerceptualLoss(l2_weight=0, lpips_weight=1, net="vgg", resize_to=64)
    with torch.no_grad():
        lp_vgg = sum(judge(recon[i:i + 250], test_x[i:i + 250]).item() * len(recon[i:i + 250])
                     for i in range(0, len(test_x), 250)) / len(test_x)
    aux.remove()
    return {"psnr": 10 * math.log10(1 / mse), "lpips_vgg64": lp_vgg,
            "loss_ms_per_step": 1000 * t_loss / args.steps}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=["none", "64", "128"])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--train-per-class", type=int, default=200)
    p.add_argument("--test-per-class", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=None)
    args = p.parse_args(argv)
    # the encoder is frozen on purpose: recon_aux's warning that only the head trains is expected
    warnings.filterwarnings("ignore", message=".*trains the head only", category=RuntimeWarning)
    train = load_dataset("cifar10", data_root=args.data_root, train=True)
    test = load_dataset("cifar10", data_root=args.data_root, train=False)
    train_x = to_float(train.images[balanced_subset(train.targets, args.train_per_class, 0)])
    test_x = to_float(test.images[balanced_subset(test.targets, args.test_per_class, 0)])
    print(f"head trained {args.steps} steps (batch {args.batch_size}, Adam 2e-3) on "
          f"{len(train_x)} CIFAR-10 train images, frozen random AlexNet-CIFAR w0.5, L2+LPIPS-alex;"
          f" scored on {len(test_x)} test images; seed {args.seed}; "
          f"{torch.get_num_threads()} CPU threads")
    print(f"{'resize_to':>10} {'PSNR dB':>8} {'LPIPS-vgg@64':>13} {'loss ms/step':>13}")
    for s in args.sizes:
        size = None if s == "none" else int(s)
        r = run(size, train_x, test_x, args)
        print(f"{s:>10} {r['psnr']:>8.2f} {r['lpips_vgg64']:>13.4f} "
              f"{r['loss_ms_per_step']:>13.1f}", flush=True)


if __name__ == "__main__":
    main()
