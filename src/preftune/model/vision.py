"""Image-text-to-text models (vision tower + projector + causal LM): LLaVA, LLaVA-NeXT, LLaVA-OneVision (an
image's tokens depend on its row: ``ImageInputs.by_row``), Idefics3, SmolVLM, Qwen2-VL, Qwen2.5-VL and
Qwen3-VL (3-D rotary positions: ``ImageInputs.rope_positions``), Gemma 3 (image blocks attend both ways).

The image is part of the prompt. :func:`image_text_inputs` builds the language model's input
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
SUPPORTED_FAMILIES = {"llava": "LLaVA", "llava_next": "LLaVA-NeXT", "llava_onevision": "LLaVA-OneVision",
                      "idefics3": "Idefics3",
                      "smolvlm": "SmolVLM", "qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL",
                      "qwen3_vl": "Qwen3-VL", "gemma3": "Gemma 3"}
# image tokens attend to every token of their own image (both ways), as these models' masks say
BIDIRECTIONAL_IMAGES = ("gemma3",)
GRID_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")  # patch grids and 3-D rotary positions (mrope)
BY_ROW_FAMILIES = ("llava_onevision",)  # an image's tokens depend on how many images its row holds
# model types that are refused, and why (any other image-text model type: "not supported yet")
REFUSED_FAMILIES = {
    "qwen3_vl_moe": "its mixture-of-experts decoder is not tested with images yet",
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
    if config.model_type in GRID_FAMILIES:
        from preftune.model.processors import GridProcessor, image_processor_of

        grids = GridProcessor(image_processor_of(path, trust_remote_code), tokenizer, _image_token_id(config))
        inputs = ImageInputs.from_processor(grids, _image_token_id(config))
        inputs.grid = grids.grid
        return inputs
    if config.model_type in BY_ROW_FAMILIES:
        from preftune.model.processors import OneVisionProcessor, image_processor_of

        rows = OneVisionProcessor(image_processor_of(path, trust_remote_code), tokenizer, Path(path))
        inputs = ImageInputs.from_processor(rows, _image_token_id(config))
        inputs.by_row = True
        return inputs
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    processor.tokenizer = tokenizer  # one tokenizer for text and images (the run's chat template, pad token)
    if getattr(processor.image_processor, "do_pan_and_scan", False):  # Gemma 3's crops: not placed
        raise ValueError(f"config: model: {path}: pan-and-scan (do_pan_and_scan in its "
                         "preprocessor_config.json) is not supported; set it to false")
    return ImageInputs.from_processor(processor, _image_token_id(config))


def same_image_tokens(a: ImageInputs | None, b: ImageInputs | None) -> bool:
    """Whether two models turn images into the same tokens (both text-only, or the same placeholder,
    image token and expansion of a probe image): what scoring one model's samples under the other needs."""
    if a is None or b is None:
        return a is b
    return ((a.image_token_id, a.feature_token_id, a.expansion((40, 24)))
            == (b.image_token_id, b.feature_token_id, b.expansion((40, 24))))


def _rows(features: Any) -> Tensor:
    """A family's feature output (a ``[I, P, H]`` tensor, or one ``[N_i, H]`` tensor per image or sample)
    as ``[rows, H]`` in token order."""
    if isinstance(features, list | tuple):
        return torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
    return features.reshape(-1, features.shape[-1])


def image_features(model: nn.Module, pixel_inputs: dict[str, Tensor],
                   dtype: torch.dtype) -> tuple[Tensor, list[Tensor]]:
    """The model's ``get_image_features`` on the batch's images (the image processor's tensors, those it
    takes): ``[image tokens, H]`` in the order of the tokens they fill, and Qwen3-VL's deepstack features
    (one ``[image tokens, H]`` per early decoder layer; ``[]`` for other families). Each family returns its
    own shape: ``[I, P, H]`` (LLaVA), one ``[N_i, H]`` per image (LLaVA-NeXT with its newline rows, Qwen)
    or per sample (Idefics3: its tiles and global view)."""
    accepted = inspect.signature(model.get_image_features).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    kwargs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in pixel_inputs.items()
              if takes_all or k in accepted}
    out = model.get_image_features(**kwargs)
    features = out.pooler_output if hasattr(out, "pooler_output") else out
    return _rows(features), [_rows(f) for f in getattr(out, "deepstack_features", None) or []]


def image_text_inputs(model: nn.Module, input_ids: Tensor, pixel_inputs: dict[str, Tensor],
                      image_index: Tensor, image_feature: Tensor) -> dict[str, Any]:
    """The decoder's inputs for a batch with images: ``inputs_embeds`` ``[R, T, H]`` with the image
    features written at the image tokens, and for Qwen3-VL ``visual_pos_masks`` ``[R, T]`` (the image
    tokens) with ``deepstack_visual_embeds`` (per early layer, the rows added there, in flat order)."""
    embeds = model.get_input_embeddings()(input_ids)
    features, deepstack = image_features(model, pixel_inputs, embeds.dtype)
    if features.shape[0] <= int(image_feature.max()):
        raise ValueError(f"the model gives {features.shape[0]} image-feature rows for "
                         f"{pixel_inputs['pixel_values'].shape[0]} image(s), but the batch places "
                         f"{image_feature.numel()} image tokens")
    flat = embeds.reshape(-1, embeds.shape[-1])
    flat = flat.index_copy(0, image_index, features.index_select(0, image_feature).to(flat.dtype))
    inputs: dict[str, Any] = {"inputs_embeds": flat.view_as(embeds)}
    if deepstack:  # added to the hidden states of the image tokens, in the mask's (flat) order
        order = image_index.argsort()
        rows = image_feature.index_select(0, order)
        mask = torch.zeros(input_ids.numel(), dtype=torch.bool, device=input_ids.device)
        mask[image_index] = True
        inputs["visual_pos_masks"] = mask.view_as(input_ids)
        inputs["deepstack_visual_embeds"] = [f.index_select(0, rows).to(flat.dtype) for f in deepstack]
    return inputs


def image_attention_masks(mask: Tensor, image_index: Tensor, positions: Tensor,
                          window: int | None) -> dict[str, Tensor]:
    """Gemma 3's masks for a batch with images, by layer type: ``mask`` ``[R, 1, T, T]`` bool (causal, per
    segment) where each image token also sees every token of its own image (a run of consecutive image
    tokens); sliding layers also drop keys ``window`` or more positions behind the query. ``positions``:
    ``[R, T]`` position ids (a prefix-shared rejected token is as far from the prompt as its position)."""
    rows, width = mask.shape[0], mask.shape[-1]
    index = image_index.sort().values
    starts = torch.ones_like(index, dtype=torch.bool)
    starts[1:] = (index[1:] != index[:-1] + 1) | (index[1:] // width != index[:-1] // width)
    block = torch.full((rows * width,), -1, dtype=torch.long, device=mask.device)
    block[index] = starts.cumsum(0) - 1
    block = block.view(rows, width)
    same_image = (block[:, :, None] == block[:, None, :]) & (block[:, :, None] >= 0)
    full = mask | same_image[:, None]
    if window is None:
        return {"full_attention": full, "sliding_attention": full}
    near = (positions[:, :, None] - positions[:, None, :]) < window
    return {"full_attention": full, "sliding_attention": full & near[:, None]}


def vision_lora_targets(model: nn.Module, *, projector: bool) -> list[str]:
    """LoRA target module names of an image-text model: every linear layer of the language model
    (its decoder, not the output layer), and with ``projector`` those between the vision tower and the
    language model (``multi_modal_projector``, Idefics3's ``connector``, the ``merger`` at the end of
    Qwen2-VL's tower); the vision tower stays plain."""
    decoder = {id(m) for m in model.get_decoder().modules()}
    head = model.get_output_embeddings()
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is head:
            continue
        parts = name.split(".")
        # Qwen's projectors (merger, deepstack_merger_list) sit inside its tower
        in_vision = any(p in VISION_TOWERS for p in parts) and not any("merger" in p for p in parts)
        if id(module) in decoder or (projector and not in_vision):
            names.append(name)
    if not names:
        raise ValueError("found no language-model linear layers to put LoRA adapters on")
    modules = dict(model.named_modules())
    if projector and all(id(modules[n]) in decoder for n in names):
        raise ValueError(f"config: lora_projector: the {model.config.model_type} projector has no linear "
                         "layers to put LoRA adapters on (a bare weight); remove lora_projector")
    return names
