"""Image-text-to-text models (LLaVA-style: vision tower + projector + causal LM).

The image is part of the prompt. :func:`image_text_embeddings` builds the language model's input
embeddings for a :class:`~preftune.data.batching.ForwardBatch` with images:

    E = embed(input_ids)                          [R, T, H]
    F = projector(vision_tower(pixel_values))     [I, P, H]   (each image once per batch)
    E.flat[image_index] = F.flat[image_feature]   (the M image-token positions)

so the decoder then runs exactly as for text (any layout), and an image shared by the chosen and
the rejected sequence of a pair is encoded once. This is the model's own forward (``get_image_features``
then a placeholder scatter), with the scatter indexed by the batch instead of by token equality.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from preftune.data.images import ImageInputs


def is_vision_config(config: Any) -> bool:
    """An image-text-to-text config preftune can score: a vision config and an image token id."""
    return getattr(config, "vision_config", None) is not None and _image_token_id(config) is not None


def _image_token_id(config: Any) -> int | None:
    value = getattr(config, "image_token_id", None)
    return value if isinstance(value, int) else getattr(config, "image_token_index", None)


def model_config(path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoConfig

    from preftune.model.hub import from_hub_or_path

    return from_hub_or_path("model", path,
                            lambda: AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code))


def load_image_inputs(path: str, tokenizer: Any, *, trust_remote_code: bool = False) -> ImageInputs | None:
    """The model's :class:`ImageInputs` (its processor, sharing ``tokenizer``), or None for a text model."""
    from preftune.model.hub import resolve_model_path

    path = resolve_model_path(path)
    config = model_config(path, trust_remote_code)
    if not is_vision_config(config):
        return None
    from transformers import AutoProcessor

    processor_files = ("preprocessor_config.json", "processor_config.json")
    if not any((Path(path) / name).is_file() for name in processor_files):
        raise FileNotFoundError(f"config: model: {path} is an image-text model without a processor "
                                "(preprocessor_config.json); save its processor beside the weights")
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    processor.tokenizer = tokenizer  # one tokenizer for text and images (the run's chat template, pad token)
    return ImageInputs.from_processor(processor, _image_token_id(config))


def image_text_embeddings(model: nn.Module, input_ids: Tensor, pixel_values: Tensor, image_index: Tensor,
                          image_feature: Tensor) -> Tensor:
    """``[R, T, H]`` input embeddings with the image features written at the image tokens."""
    embeds = model.get_input_embeddings()(input_ids)
    out = model.get_image_features(pixel_values=pixel_values.to(embeds.dtype))
    features = out.pooler_output if hasattr(out, "pooler_output") else out
    if isinstance(features, list | tuple):
        features = torch.cat([f.reshape(-1, embeds.shape[-1]) for f in features])
    else:
        features = features.reshape(-1, embeds.shape[-1])
    if features.shape[0] <= int(image_feature.max()):
        raise ValueError(f"the model gives {features.shape[0]} image-feature rows for "
                         f"{pixel_values.shape[0]} image(s), but the batch places {image_feature.numel()} "
                         "image tokens")
    flat = embeds.reshape(-1, embeds.shape[-1])
    flat = flat.index_copy(0, image_index, features.index_select(0, image_feature).to(flat.dtype))
    return flat.view_as(embeds)


def vision_lora_targets(model: nn.Module, *, projector: bool) -> list[str]:
    """LoRA target module names of an image-text model: every linear layer of the language model
    (not its output layer), and the projector's with ``projector``; the vision tower stays plain."""
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if ".language_model." in f".{name}." or (projector and "multi_modal_projector" in name):
            names.append(name)
    if not names:
        raise ValueError("found no language_model linear layers to put LoRA adapters on")
    return names
