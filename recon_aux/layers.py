"""Which layer ``attach(model)`` taps when no ``layer=`` is given: the encoder's representation.

The rule, applied once to the execution order of the first forward:

1. **Blocks.** A block is a module below the root that is not a plain container
   (``nn.Sequential``, ``nn.ModuleList``, ``nn.ModuleDict``, or a subclass keeping Sequential's
   forward), whose output is a 3-D or 4-D tensor, and that is either a *transformer block* (an
   attention module among its children: ``nn.MultiheadAttention`` or a class named
   ``*Attention``) or a *conv block* (no attention module inside; a ``Conv2d`` and at least two
   weight layers, ``Conv2d`` or ``Linear``: residual, inception, dense, ConvNeXt and MobileNet
   blocks, and stages with their own forward), and not a pass-through wrapper (one child whose
   output it returns: ``nn.DataParallel``). Only outermost blocks count (the dense layers of a
   dense block are part of it).
2. **The last block.** The tap is the block that finished last, unless a ``Conv2d`` outside it
   ran after it (MobileNet's final 1x1 conv; then rule 3). From that block the tap climbs to its
   parent while the parent returns the very same tensor and does not hold every block: the
   stage (torchvision ResNet ``layer4``, ConvNeXt ``features.7``), never the whole trunk. After
   a transformer block, the tap moves on to the final norm when one runs on that very output
   (timm's ``norm``, torchvision's ``encoder.ln``, Swin's ``norm``): the model's own token
   output, measured to reconstruct better (:data:`FINAL_NORM`). A conv net's block output is
   kept as it is (DenseNet: ``denseblock4``, before ``norm5``), except a ResNet's: when the
   last block is a residual block (:data:`RESIDUAL_BLOCKS`), the tap is the last ``Conv2d`` of
   its residual branch (``layer4.1.conv2``; ``layer4.2.conv3`` in a ResNet-50), before its BN,
   the skip and the ReLU, measured to train better than the stage output
   (:data:`RESIDUAL_LAST_CONV`). The shortcut's conv, which reads the block's input, is not
   part of the branch.
3. **No block: the last conv.** The ``nn.Conv2d`` that ran last (AlexNet, VGG, NIN, the
   project's AlexNet-CIFAR ``conv5.0``), as before. If token layers ran after it (a ``Linear``
   on a 3-D or 4-D input, or an attention module), that conv is a stem, a patch embedding, and
   the choice is an error that names the candidate layers and how to pass one.

What it picks (32x32 inputs; the README has the same table):

===============================================  ===========================  ==============
model                                            ``layer=None``               output
===============================================  ===========================  ==============
torchvision ResNet-18 / ResNet18CIFAR            ``layer4.1.conv2``           C x h x w
torchvision / timm ResNet-50                     ``layer4.2.conv3``           C x h x w
torchvision GoogLeNet                            ``inception5b``              1024 x 1 x 1
torchvision DenseNet-121                         ``features.denseblock4``     1024 x 1 x 1
torchvision ConvNeXt / timm ConvNeXt             ``features.7`` / ``stages.3``  C x 1 x 1
torchvision VisionTransformer                    ``encoder.ln``               N x 1+h*w x D
timm ViT / DeiT (class, dist., register tokens)  ``norm``                     N x p+h*w x D
torchvision Swin / timm Swin                     ``norm``                     N x h x w x C
AlexNet, VGG, NIN, AlexNet-CIFAR                 the last Conv2d              C x h x w
MobileNet, EfficientNet (1x1 conv after blocks)  the last Conv2d              C x h x w
MLP-Mixer (no attention module)                  an error naming ``blocks.N``
===============================================  ===========================  ==============
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["FINAL_NORM", "RESIDUAL_BLOCKS", "RESIDUAL_LAST_CONV", "LayerChoiceError", "Recorder",
           "choose_layer", "is_attention"]

#: Tap a transformer's final norm (the norm that runs on the last block's output) rather than
#: the block itself. Measured by ``python -m benchmarks.studies.vit_tap`` (committed:
#: ``benchmarks/results/vit-tap-cpu.txt``): a timm ViT (patch 4 on 32 px, dim 96, depth 4)
#: trained with the objective alone for 400 steps of 128 CIFAR-10 images, tapping ``blocks.3``
#: (before) or ``norm`` (after) from the same weights, 3 seeds, after - before paired by seed:
#: test reconstruction MSE -0.0008 +- 0.0005 and LPIPS-alex -0.0019 +- 0.0008, lower in 3/3
#: seeds; kNN of the class token -1.3 +- 2.0 (lower in 2 of 3 seeds, within its spread: no
#: clear difference), of the mean patch token +0.93 +- 0.85. After reconstructs better in every
#: seed, with no clear difference in the representation: the default taps the final norm.
FINAL_NORM = True

#: Class names of ResNet residual blocks (torchvision's and timm's ``BasicBlock`` and
#: ``Bottleneck``, ResNeXt and wide ResNets included, and ``adapters.backbones.BasicBlock``).
#: Other residual designs (pre-activation, RegNet, ConvNeXt) keep the block or stage output.
RESIDUAL_BLOCKS = ("BasicBlock", "Bottleneck")

#: Tap a ResNet's last residual branch conv (``layer4.1.conv2``) rather than the stage output
#: (``layer4``, after BN, skip and ReLU). Measured (issue 15) on the simclr-cpu matrix:
#: SimCLR (lightly) +recon, CIFAR ResNet-18 width 0.25, 20k CIFAR-10 images, 8 epochs, L2 +
#: LPIPS-alex, fair evaluation; 3 seeds, paired by seed, ``layer4`` − ``layer4.1.conv2``:
#: kNN pool -0.7 ± 0.3, kNN layer3 -1.0 ± 0.1, linear pool -0.7 ± 0.9 (no clear difference).
#: +recon − base with ``layer4.1.conv2``: kNN pool +3.0 ± 0.5, layer3 +0.9 ± 0.3, linear +2.6 ±
#: 0.6; with ``layer4``: +2.4 ± 0.3, -0.0 ± 0.3, +1.9 ± 0.4
#: (``benchmarks/results/simclr-cpu-layer/tap-comparison.txt``). The branch conv trains better:
#: the default taps it. Measured on BasicBlock only; a Bottleneck's ``conv3`` follows the same
#: rule by analogy.
RESIDUAL_LAST_CONV = True


class LayerChoiceError(ValueError):
    """``layer=None`` found no representation to tap (only a stem, or nothing)."""


def is_attention(m: nn.Module) -> bool:
    """True for ``nn.MultiheadAttention`` and any module whose class name ends in
    ``Attention`` (timm's, torchvision's, lightly's): what makes a block a transformer block."""
    return isinstance(m, nn.MultiheadAttention) or type(m).__name__.endswith("Attention")


def is_container(m: nn.Module) -> bool:
    """True for a module that only holds others (a ``ModuleList``/``ModuleDict`` without a
    forward of its own, or anything that runs ``nn.Sequential.forward``)."""
    return (isinstance(m, (nn.ModuleList, nn.ModuleDict)) and "forward" not in type(m).__dict__) \
        or type(m).forward is nn.Sequential.forward


def _within(name: str, ancestor: str) -> bool:
    return name == ancestor or ancestor == "" or name.startswith(ancestor + ".")


class Recorder:
    """One forward's execution record: when each module finished, its output, its input.

    ``record`` only appends (cheap to trace under ``torch.compile``); the tables are built on
    first use.

    Attributes:
        events: ``(module name, its positional inputs, its output)`` in the order the modules
            finished; :attr:`end`, :attr:`out`, :attr:`in_dim`, :attr:`calls` and
            :attr:`first_in` are tables built from it.
    """

    def __init__(self) -> None:
        self.events: list[tuple[str, tuple, object]] = []
        self._tables: tuple | None = None

    def record(self, name: str, args: tuple, output: object) -> None:
        """Note that module ``name`` finished with ``output`` (a forward hook's arguments)."""
        self.events.append((name, args, output))
        self._tables = None

    def _build(self) -> tuple:
        if self._tables is None:
            end, out, in_dim, calls, first_in = {}, {}, {}, {}, {}
            for t, (name, args, output) in enumerate(self.events, 1):
                first = args[0] if args else None
                end[name], out[name], first_in[name] = t, output, first
                in_dim[name] = first.dim() if isinstance(first, Tensor) else None
                calls[name] = calls.get(name, 0) + 1
            self._tables = (end, out, in_dim, calls, first_in)
        return self._tables

    @property
    def end(self) -> dict[str, int]:
        """Module name -> position of its (last) finish in the forward."""
        return self._build()[0]

    @property
    def out(self) -> dict[str, object]:
        """Module name -> its (last) output."""
        return self._build()[1]

    @property
    def in_dim(self) -> dict[str, int | None]:
        """Module name -> number of dimensions of its first input (None if not a tensor)."""
        return self._build()[2]

    @property
    def calls(self) -> dict[str, int]:
        """Module name -> times it ran."""
        return self._build()[3]

    @property
    def first_in(self) -> dict[str, object]:
        """Module name -> its (last call's) first input."""
        return self._build()[4]

    def __bool__(self) -> bool:
        return bool(self.events)


def _kind(m: nn.Module) -> str | None:
    if is_container(m):
        return None
    if any(is_attention(c) for c in m.children()):
        return "transformer"
    convs = weights = 0
    for s in m.modules():
        if is_attention(s):
            return None
        convs += isinstance(s, nn.Conv2d)
        weights += isinstance(s, (nn.Conv2d, nn.Linear))
    return "conv" if convs >= 1 and weights >= 2 else None


def _wrapper(name: str, m: nn.Module, rec: Recorder) -> bool:
    """A pass-through wrapper (``nn.DataParallel`` around DeepCluster's ``features``): one child,
    whose output it returns as it is."""
    children = [c for c, _ in m.named_children()]
    if len(children) != 1:
        return False
    child = f"{name}.{children[0]}" if name else children[0]
    return rec.out.get(child) is rec.out[name]


def _is_map(x) -> bool:
    return isinstance(x, Tensor) and x.dim() in (3, 4)


def _outermost(names: list[str]) -> list[str]:
    return [n for n in names if not any(a != n and _within(n, a) for a in names)]


def choose_layer(model: nn.Module, rec: Recorder) -> str:
    """The layer to tap in ``model`` by the module docstring's rule, from the record ``rec`` of
    its first forward (``rec`` keys are module names; the root, ``""``, is not recorded)."""
    modules = dict(model.named_modules())
    ran = [n for n in rec.end if n in modules]
    convs = [n for n in ran if isinstance(modules[n], nn.Conv2d)]
    last_conv = max(convs, key=rec.end.get) if convs else None
    eligible = [n for n in ran if _is_map(rec.out[n]) and _kind(modules[n]) is not None
                and not _wrapper(n, modules[n], rec)]
    blocks = _outermost(eligible)
    if blocks:
        last = max(blocks, key=rec.end.get)
        if last_conv is None or rec.end[last_conv] <= rec.end[last] \
                or _within(last_conv, last):
            name = _climb(last, rec, blocks)
            if FINAL_NORM and _kind(modules[last]) == "transformer":
                name = _final_norm(name, rec, modules) or name
            if RESIDUAL_LAST_CONV:
                name = _residual_branch_conv(name, rec, modules) or name
            return name
    if last_conv is not None:
        after = [n for n in ran if rec.end[n] > rec.end[last_conv]]
        tokens = [n for n in after if is_attention(modules[n]) or (
            isinstance(modules[n], nn.Linear) and (rec.in_dim[n] or 0) >= 3)]
        if not tokens:
            return last_conv
        why = (f"its last nn.Conv2d, {last_conv!r}, is a stem (a patch embedding): token layers "
               f"({tokens[0]!r}, ...) ran after it")
        candidates = _candidates(modules, rec, [n for n in after if not _within(last_conv, n)])
    else:
        why = "it ran no nn.Conv2d and no block recon_aux recognises"
        candidates = _candidates(modules, rec, ran)
    hint = (f" Candidates (the last first): {candidates}. Pass one, e.g. "
            f"recon_aux.attach(model, optimizer, layer={candidates[0]!r}), or several for a "
            "multi-level tap." if candidates else
            " Pass layer='NAME' of a module that outputs N x C x h x w, N x h x w x C or "
            "N x L x D tokens.")
    raise LayerChoiceError(f"recon_aux cannot choose the layer of {type(model).__name__} "
                           f"(layer=None): {why}.{hint}")


def _climb(name: str, rec: Recorder, blocks: list[str]) -> str:
    while "." in name:
        parent = name.rpartition(".")[0]
        out = rec.out.get(parent)
        if not _is_map(out) or out is not rec.out[name] or all(_within(b, parent) for b in blocks):
            break
        name = parent
    return name


def _residual_branch_conv(name: str, rec: Recorder, modules: dict[str, nn.Module]) -> str | None:
    """The last conv of the residual branch of the ResNet block whose output ``name`` returns
    (``layer4`` -> ``layer4.1.conv2``), or None when ``name`` does not end in such a block."""
    blocks = [n for n in rec.end if _within(n, name) and n in modules
              and type(modules[n]).__name__ in RESIDUAL_BLOCKS and rec.out[n] is rec.out[name]]
    if not blocks:
        return None
    block = max(blocks, key=rec.end.get)
    branch = [n for n in rec.end if n != block and _within(n, block)
              and isinstance(modules.get(n), nn.Conv2d)
              and rec.first_in[n] is not rec.first_in[block]]  # not the shortcut's conv
    return max(branch, key=rec.end.get) if branch else None


def is_norm(m: nn.Module) -> bool:
    """True for a normalisation layer (LayerNorm, GroupNorm, BatchNorm, or a class named
    ``*Norm*``, e.g. timm's ``LayerNorm2d`` or an ``RMSNorm``)."""
    return isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)) \
        or "Norm" in type(m).__name__


def _final_norm(name: str, rec: Recorder, modules: dict[str, nn.Module]) -> str | None:
    """The norm that ran next on the very output of ``name`` (a ViT's final LayerNorm)."""
    out = rec.out[name]
    after = sorted((n for n in rec.end if rec.end[n] > rec.end[name] and not _within(n, name)),
                   key=rec.end.get)
    return next((n for n in after if rec.first_in[n] is out and is_norm(modules[n])
                 and _is_map(rec.out[n])), None)


def _candidates(modules: dict[str, nn.Module], rec: Recorder, names: list[str]) -> list[str]:
    """Modules worth naming in an error: non-leaf, with parameters, returning a map; repeated
    units (siblings of one type: the blocks) first."""
    found = [n for n in names if _is_map(rec.out[n]) and any(True for _ in modules[n].children())
             and any(True for _ in modules[n].parameters())]

    def parent(n: str) -> str:
        return n.rpartition(".")[0]

    repeated = [n for n in found if any(s != n and parent(s) == parent(n)
                                        and type(modules[s]) is type(modules[n]) for s in found)]
    pool = repeated or [n for n in found if not is_container(modules[n])]
    return sorted(_outermost(pool), key=rec.end.get, reverse=True)[:5]
