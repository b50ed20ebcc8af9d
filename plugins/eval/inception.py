"""Inception-v3 features through torch-fidelity (the TF-2015 FID network ported to PyTorch).

Weights are resolved like every pretrained file: ``--inception`` or ``$MINFM_INCEPTION_WEIGHTS``
(a local file, or a Hub reference ``org/name/file`` read from the HF cache), else torch-fidelity's
file in the torch hub cache; downloaded there only when the Hub is not offline.
The file is read by us (``weights_only=True``, or safetensors) and handed to torch-fidelity,
whose own loader would unpickle it without that guard.

An extractor maps uint8 images ``(N, 3, H, W)`` to float32 features:
``pool`` (N, 2048) for FID and precision/recall, ``spatial`` (N, 2023) for sFID (the first
7 channels of ``mixed_6/conv``, 17 x 17, in TF's height-width-channel order, as the ADM
suite) and ``logits`` (N, 1008, without bias) for the Inception Score.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from minfm_core.errors import MinfmError, first_line

WEIGHTS_ENV = "MINFM_INCEPTION_WEIGHTS"
WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILE}"


def _hub_cache_file() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def resolve_inception_weights(ref: str | None = None) -> Path:
    """A local Inception weights file; one-line :class:`MinfmError` when it cannot be had offline."""
    from minfm_core.pretrained import offline, resolve_pretrained

    ref = ref or os.environ.get(WEIGHTS_ENV) or None
    if ref:
        return resolve_pretrained(ref)
    cached = _hub_cache_file()
    if cached.is_file():
        return cached
    if offline():
        raise MinfmError(
            f"Inception weights: {WEIGHTS_FILE} is not in the torch hub cache ({cached.parent}) and the Hub is "
            f"offline; pass --inception FILE or set {WEIGHTS_ENV} (torch-fidelity's file, from {WEIGHTS_URL})"
        )
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(WEIGHTS_URL, str(cached), hash_prefix="6726825d", progress=False)
    except Exception as exc:  # network, proxy, disk: the user's to fix
        reason = first_line(exc)
        raise MinfmError(f"Inception weights: could not download {WEIGHTS_URL} ({reason}); "
                         f"pass --inception FILE or set {WEIGHTS_ENV}") from None
    return cached


#: Largest Inception weights file read (torch-fidelity's is 95 MB): it is read whole into memory.
MAX_WEIGHTS_BYTES = 1 << 30


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an Inception weights file (``.safetensors``, else a ``weights_only`` pickle).

    The file may come from anywhere (docs/security.md): only a regular file is read, bounded
    and through one descriptor (a FIFO would block ``open`` forever, and safetensors' loader
    ignores SIGTERM while it waits), and what it holds must be a flat name -> tensor mapping.
    """
    import io

    from minfm_core.textfiles import read_bounded

    data = read_bounded(path, f"{path}: Inception weights", MAX_WEIGHTS_BYTES)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load as load_safetensors_bytes

            state = load_safetensors_bytes(data)
        else:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MinfmError(f"{path}: not a readable Inception state dict ({type(exc).__name__}: "
                         f"{first_line(exc)})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise MinfmError(f"{path}: not an Inception state dict (expected a mapping of names to tensors)")
    return state


class InceptionFeatures:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` plus the sFID spatial tap."""

    def __init__(self, weights: str | Path | None = None, device: str | torch.device = "cpu") -> None:
        from minfm_core.weights import check_keys

        path = resolve_inception_weights(str(weights) if weights else None)
        state = load_state_dict(path)
        try:
            from torch_fidelity import feature_extractor_inceptionv3 as fe
        except ImportError as exc:
            raise MinfmError(f"minfm eval needs torch-fidelity and a torchvision matching torch "
                             f"(pip install 'minfm[eval]'): {exc}") from None

        class Checked(fe.FeatureExtractorInceptionV3):
            # torch's strict load says "Error(s) in loading state_dict" over many lines, as a
            # traceback: name the file and the keys that do not fit, on one line, first.
            def load_state_dict(self, sd, *args, **kwargs):
                check_keys(self, sd, f"{path}: Inception weights")
                return super().load_state_dict(sd, *args, **kwargs)

        original = fe.load_state_dict_from_url
        fe.load_state_dict_from_url = lambda *a, **k: state  # our safely loaded tensors, no download
        try:
            self.net = Checked("inception-v3-compat", ["2048", "logits_unbiased"])
        finally:
            fe.load_state_dict_from_url = original
        self.device = torch.device(device)
        self.net.to(self.device)
        self._spatial: torch.Tensor | None = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._tap)

    def _tap(self, module, inputs, output) -> None:
        self._spatial = output[:, :7]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        pool, logits = self.net(images.to(self.device))
        spatial = self._spatial.permute(0, 2, 3, 1).reshape(images.shape[0], -1).float()
        return {"pool": pool.float(), "spatial": spatial, "logits": logits.float()}
