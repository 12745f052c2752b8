"""Image-text-to-text models (vision tower + projector + causal LM: LLaVA, LLaVA-NeXT, Idefics3, SmolVLM).

The image is part of the prompt. :func:`image_text_embeddings` builds the language model's input
embeddings for a :class:`~preftune.data.batching.ForwardBatch` with images:

    E = embed(input_ids)                          [R, T, H]
    F = get_image_features(**pixel_inputs)        [image tokens, H]   (each image once per batch)
    E.flat[image_index] = F[image_feature]        (the M image-token positions)

so the decoder then runs exactly as for text (any layout), and an image shared by the chosen and
the rejected sequence of a pair is encoded once. This is the model's own forward (``get_image_features``
then a placeholder scatter), with the scatter indexed by the batch instead of by token equality.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from preftune.data.images import ImageInputs

# the model types whose images preftune places exactly (tests/test_vision_families.py)
SUPPORTED_FAMILIES = {"llava": "LLaVA", "llava_next": "LLaVA-NeXT", "idefics3": "Idefics3",
                      "smolvlm": "SmolVLM"}
_MROPE = "its positions are 3-D rotary (mrope, from image_grid_thw), which preftune does not build yet"
# model types that are refused, and why (any other image-text model type: "not supported yet")
REFUSED_FAMILIES = {
    "qwen2_vl": _MROPE, "qwen2_5_vl": _MROPE, "qwen3_vl": _MROPE, "qwen3_vl_moe": _MROPE,
    "gemma3": "its image tokens attend to each other both ways (token_type_ids), and preftune's attention "
              "masks are causal",
    "llava_onevision": "an image's token count depends on how many images its row holds",
    "mllama": "its images enter through cross-attention layers, not as tokens of the prompt",
    "paligemma": "its prompt attends both ways (a prefix language model)",
}
VISION_TOWERS = ("vision_tower", "vision_model", "visual")  # module names of the image encoder


def check_family(config: Any) -> None:
    """Raise ValueError (one line) for an image-text model type preftune cannot place images for."""
    kind = getattr(config, "model_type", "?")
    if kind in SUPPORTED_FAMILIES:
        return
    why = REFUSED_FAMILIES.get(kind, "its image inputs are not supported yet")
    raise ValueError(f"config: model: a {kind} image-text model: {why} (supported: "
                     f"{', '.join(SUPPORTED_FAMILIES.values())})")


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
    check_family(config)
    from transformers import AutoProcessor

    processor_files = ("preprocessor_config.json", "processor_config.json")
    if not any((Path(path) / name).is_file() for name in processor_files):
        raise FileNotFoundError(f"config: model: {path} is an image-text model without a processor "
                                "(preprocessor_config.json); save its processor beside the weights")
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    processor.tokenizer = tokenizer  # one tokenizer for text and images (the run's chat template, pad token)
    return ImageInputs.from_processor(processor, _image_token_id(config))


def image_features(model: nn.Module, pixel_inputs: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
    """``[image tokens, H]``: the model's ``get_image_features`` on the batch's images (the image
    processor's tensors, those it takes), flattened in the order of the image tokens it fills. Each
    family returns its own shape: a ``[I, P, H]`` tensor (LLaVA), one ``[N_i, H]`` tensor per image
    (LLaVA-NeXT, newline rows included) or per sample (Idefics3, its tiles and global view)."""
    accepted = inspect.signature(model.get_image_features).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    kwargs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in pixel_inputs.items()
              if takes_all or k in accepted}
    out = model.get_image_features(**kwargs)
    features = out.pooler_output if hasattr(out, "pooler_output") else out
    if isinstance(features, list | tuple):
        return torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
    return features.reshape(-1, features.shape[-1])


def image_text_embeddings(model: nn.Module, input_ids: Tensor, pixel_inputs: dict[str, Tensor],
                          image_index: Tensor, image_feature: Tensor) -> Tensor:
    """``[R, T, H]`` input embeddings with the image features written at the image tokens."""
    embeds = model.get_input_embeddings()(input_ids)
    features = image_features(model, pixel_inputs, embeds.dtype)
    if features.shape[0] <= int(image_feature.max()):
        raise ValueError(f"the model gives {features.shape[0]} image-feature rows for "
                         f"{pixel_inputs['pixel_values'].shape[0]} image(s), but the batch places "
                         f"{image_feature.numel()} image tokens")
    flat = embeds.reshape(-1, embeds.shape[-1])
    flat = flat.index_copy(0, image_index, features.index_select(0, image_feature).to(flat.dtype))
    return flat.view_as(embeds)


def vision_lora_targets(model: nn.Module, *, projector: bool) -> list[str]:
    """LoRA target module names of an image-text model: every linear layer of the language model
    (its decoder, not the output layer), and with ``projector`` those between the vision tower and the
    language model (``multi_modal_projector``, Idefics3's ``connector``); the vision tower stays plain."""
    decoder = {id(m) for m in model.get_decoder().modules()}
    head = model.get_output_embeddings()
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is head:
            continue
        in_vision = any(part in VISION_TOWERS for part in name.split("."))
        if id(module) in decoder or (projector and not in_vision):
            names.append(name)
    if not names:
        raise ValueError("found no language-model linear layers to put LoRA adapters on")
    return names
