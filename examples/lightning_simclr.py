"""SimCLR on CIFAR-10 as a PyTorch Lightning module, plus the recon-aux objective.

The module follows lightly's ``examples/pytorch_lightning/simclr.py``; the only additions are
the two lines marked ``# recon-aux``. Lightning creates the optimizer later (in
``configure_optimizers``), so ``attach`` gets no optimizer but ``input_shape``: the head is built
at once from a dry forward that changes nothing in the backbone, and, being a submodule of this
LightningModule, it is in ``self.parameters()`` (once; the frozen LPIPS network is not), in the
Lightning checkpoint (LPIPS is not), moved by Lightning to the device, and averaged by Lightning's
DDP like any other layer.

    python -m examples.lightning_simclr --data-root ../shared/data --epochs 10
    python -m examples.lightning_simclr --data-root ../shared/data --epochs 20 \
        --resume lightning_logs/version_0/checkpoints/last.ckpt

Checkpoints get a ``.sha256`` side file as they are written (:class:`VerifiedCheckpointIO`);
``--resume`` checks it in full and loads with ``weights_only=True`` (Lightning's default lets a
checkpoint file run code when it is unpickled).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from lightly.transforms import SimCLRTransform
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from torch import nn

import recon_aux
from adapters.files import atomic_write
from examples.common import NORMALIZE, backbone, fail, finish, parser, train_loader
from recon_aux.weights import sha256_of


class SimCLR(pl.LightningModule):
    def __init__(self, backbone: nn.Module, lr: float = 0.06, recon: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection_head = SimCLRProjectionHead(backbone.out_dim, 512, 128)
        self.criterion = NTXentLoss()
        self.lr = lr
        # recon-aux line 1: no optimizer yet, so build the head now from the input shape.
        self.aux = (recon_aux.attach(self.backbone, input_shape=(3, 32, 32), **NORMALIZE)
                    if recon else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.backbone(x))

    def training_step(self, batch, batch_index):
        (x0, x1), _, _ = batch
        z0, z1 = self.forward(x0), self.forward(x1)
        loss = self.criterion(z0, z1)
        if self.aux is not None:
            loss = loss + self.aux.loss(x0) + self.aux.loss(x1)  # recon-aux line 2
            self.log_dict({"recon_l2": self.aux.last["l2"], "recon_lpips": self.aux.last["lpips"]})
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class VerifiedCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint files, each with its full sha256 in a side file ``PATH.sha256``
    (written after the checkpoint, removed with it), so a resume can verify what it unpickles."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(f"{path}.sha256", f"{sha256_of(path)}\n".encode())

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
        Path(f"{path}.sha256").unlink(missing_ok=True)


def verified_checkpoint(path: str) -> str:
    """``path`` once its side file's sha256 matches the file in full; else a one-line error."""
    if "://" in path:
        fail(f"--resume {path}: give a local checkpoint file (remote files are not verified).")
    file, side = Path(path), Path(f"{path}.sha256")
    if not file.is_file():
        fail(f"--resume {path}: no such checkpoint file.")
    if not side.is_file():
        fail(f"--resume {path}: no {side.name} beside it to verify it before unpickling; resume "
             f"from a checkpoint this example wrote, or, if you trust the file, write its "
             f"sha256: sha256sum {file.name} | cut -d' ' -f1 > {side.name}")
    expected = (side.read_text().split() or [""])[0]
    if sha256_of(file) != expected.lower():
        fail(f"--resume {path}: its sha256 does not match {side.name}: the file changed since "
             "it was written; resume from another checkpoint, or start again.")
    return path


def main(argv: list[str] | None = None) -> float | None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--out", default=".", help="Lightning's default_root_dir: logs and "
                   "checkpoints go to OUT/lightning_logs/version_N/")
    p.add_argument("--resume", default=None, help="a Lightning checkpoint to continue from")
    args = p.parse_args(argv)
    resume = verified_checkpoint(args.resume) if args.resume else None  # before any work
    pl.seed_everything(args.seed, verbose=False)
    model = SimCLR(backbone(args), lr=args.lr, recon=args.recon)
    loader = train_loader(args, SimCLRTransform(input_size=32, gaussian_blur=0.0))
    trainer = pl.Trainer(
        max_epochs=args.epochs, max_steps=args.max_steps or -1, default_root_dir=args.out,
        accelerator="gpu" if args.device.startswith("cuda") else "cpu", devices=1,
        callbacks=[pl.callbacks.ModelCheckpoint(save_last=True)],
        plugins=[VerifiedCheckpointIO()],
        enable_progress_bar=sys.stderr.isatty(), log_every_n_steps=1,
    )
    trainer.fit(model, loader, ckpt_path=resume, weights_only=True)
    model.to(args.device)
    if model.aux is not None and model.aux.last:
        print(f"recon l2 {model.aux.last['l2']:.4f} lpips {model.aux.last['lpips']:.4f} "
              f"after {trainer.global_step} steps")
    images = next(iter(loader))[0][0].to(args.device) if args.pictures else None
    return finish(model.backbone, model.aux, images, args)


if __name__ == "__main__":
    main(sys.argv[1:])
