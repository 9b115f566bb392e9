"""Named configurations of the published ViL models and checkpoint loading.

The published files (``vil2_{tiny,small,base}16_e{800,400}_in1k.th`` from
https://ml.jku.at/research/vision_lstm/download/) hold ``{"state_dict": ...}`` with the names of
NX-AI's training code; ``convert_training_state_dict`` maps them onto this model's names (which are
those of the reference ``VisionLSTM2``). Nothing is downloaded here: pass a local path.
"""

import copy
import os
import re

import torch

from .model import VisionLSTM

__all__ = ["MODEL_CONFIGS", "MODEL_URLS", "create_model", "list_models", "load_checkpoint",
           "convert_training_state_dict"]

_PUBLISHED = dict(legacy_norm=True, pooling="bilateral_flatten", conv_kind="2d",
                  conv_kernel_size=3, norm_bias=True, proj_bias=True, patch_size=16,
                  input_shape=(3, 224, 224), output_shape=(1000,))

MODEL_CONFIGS = {
    "vil2-tiny": dict(dim=192, depth=12, **_PUBLISHED),
    "vil2-tiny-e400": dict(dim=192, depth=12, **_PUBLISHED),
    "vil2-small": dict(dim=384, depth=12, **_PUBLISHED),
    "vil2-base": dict(dim=768, depth=12, **_PUBLISHED),
    # No checkpoint: the ~300M configuration NX-AI used for speed tests only.
    "vil2-large": dict(dim=1024, depth=24, **_PUBLISHED),
}

_BASE_URL = "https://ml.jku.at/research/vision_lstm/download/"
MODEL_URLS = {
    "vil2-tiny": _BASE_URL + "vil2_tiny16_e800_in1k.th",
    "vil2-tiny-e400": _BASE_URL + "vil2_tiny16_e400_in1k.th",
    "vil2-small": _BASE_URL + "vil2_small16_e400_in1k.th",
    "vil2-base": _BASE_URL + "vil2_base16_e400_in1k.th",
}


def list_models(pattern=None):
    """Names accepted by ``create_model`` (optionally filtered by a substring/glob pattern)."""
    names = sorted(MODEL_CONFIGS)
    if pattern:
        import fnmatch
        names = [n for n in names if fnmatch.fnmatch(n, pattern) or pattern in n]
    return names


def create_model(name, checkpoint=None, img_size=None, num_classes=None, pretrained=False,
                 **overrides):
    """Build a named ViL: ``create_model("vil2-tiny", img_size=448, checkpoint="vil2_tiny16_e800_in1k.th")``.

    ``overrides`` are any ``VisionLSTM`` keywords (e.g. ``mlstm_backend``, ``drop_path_rate``,
    ``mode="features"``). ``checkpoint`` is a local file in the published training format or a
    plain state_dict; its position embedding is resized to ``img_size``. With ``num_classes``
    different from the checkpoint's, the head is left freshly initialised. ``pretrained=True``
    downloads the published ImageNet-1K weights (``MODEL_URLS``) through ``torch.hub``'s cache.
    """
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(list_models())}")
    kwargs = copy.deepcopy(MODEL_CONFIGS[name])
    kwargs.update(overrides)
    if img_size is not None:
        kwargs["img_size"] = img_size
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if pretrained and checkpoint is not None:
        raise ValueError("pass either pretrained=True or checkpoint=..., not both")
    if pretrained and name not in MODEL_URLS:
        raise ValueError(f"no published checkpoint for {name!r}; these have one: "
                         f"{', '.join(sorted(MODEL_URLS))}")
    model = VisionLSTM(**kwargs)
    if pretrained:
        checkpoint = torch.hub.load_state_dict_from_url(MODEL_URLS[name], map_location="cpu")
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model


_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def convert_training_state_dict(sd):
    """Map the names of NX-AI's training checkpoints onto ``VisionLSTM`` names. Names that are
    already in model format pass through, so this is safe to apply to either."""
    if any(k.startswith("blocks.") and (".rowwise_from_top_left." in k
                                        or ".rowwise_from_bot_right." in k) for k in sd):
        return dict(sd)                                                # model format already
    out = {}
    for key, value in sd.items():
        k = key.replace(".xlstm.", ".layer.")
        if k.startswith("xlstm."):
            k = k[len("xlstm."):]
        k = k.replace(".xlstm_norm.", ".norm.").replace(".conv1d.", ".conv.")
        m = _BLOCK.match(k)
        if m:
            i = int(m.group(1))
            direction = "rowwise_from_top_left" if i % 2 == 0 else "rowwise_from_bot_right"
            k = f"blocks.{i // 2}.{direction}." + k[m.end():]
        if k.startswith("post_blocks_norm."):
            k = "norm." + k[len("post_blocks_norm."):]
        elif k.startswith("head.0."):
            k = "legacy_norm." + k[len("head.0."):]
        elif k.startswith("head.1."):
            k = "head." + k[len("head.1."):]
        out[k] = value
    return out


def load_checkpoint(model, path_or_state_dict, strict=True):
    """Load a published training-format file (``{"state_dict": ...}``), a ``{"model": ...}``
    wrapper or a plain state_dict (path or dict) into ``model``. The position embedding is
    resized to the model's grid (a 224 checkpoint into a 448 model). A head whose shape differs
    from the model's (another ``num_classes``) is skipped and reported. Returns the
    ``load_state_dict`` result."""
    obj = path_or_state_dict
    if isinstance(obj, (str, os.PathLike)):
        obj = torch.load(obj, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
            break
    sd = convert_training_state_dict(obj)
    if model.mode == "classifier" and model.head is not None:
        own = model.head.weight.shape
        if "head.weight" in sd and sd["head.weight"].shape != own:
            import warnings
            warnings.warn(f"checkpoint head {tuple(sd['head.weight'].shape)} does not match the "
                          f"model's {tuple(own)}: keeping the model's fresh head")
            sd["head.weight"], sd["head.bias"] = model.head.weight.detach(), model.head.bias.detach()
    return model.load_state_dict(sd, strict=strict)
