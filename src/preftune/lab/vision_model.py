"""A tiny LLaVA-style image-text model built offline: a small ViT (CLIP vision config, random
weights) + a two-layer projector + the embedded stories260K language model (its pretrained weights,
one row added to the vocabulary for the ``<image>`` placeholder).

The directory it writes is an ordinary Hugging Face model directory (weights as safetensors, the
processor and its chat template beside them), so every preftune command loads it like any other
image-text model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from preftune.model.hub import EMBEDDED_MODEL

IMAGE_TOKEN = "<image>"
# Q/A turns; an image part renders as the placeholder, which the processor expands to the image's tokens
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}{{ 'Q: ' }}{%- elif m['role'] == 'assistant' -%}{{ 'A: ' }}{%- endif -%}"
    "{%- if m['content'] is string -%}{{ m['content'] }}{%- else -%}"
    "{%- for p in m['content'] -%}{%- if p['type'] == 'image' -%}{{ '<image>' }}{%- else -%}{{ p['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- if m['role'] == 'assistant' -%}{{ eos_token }}{%- endif -%}{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'A:' }}{%- endif -%}"
)


def build_tiny_vlm(directory: str | Path, *, seed: int = 0, image_size: int = 32, patch_size: int = 8,
                   vision_hidden: int = 64, vision_layers: int = 2) -> Path:
    """Write the tiny model to ``directory`` and return it. Deterministic in ``seed``: the vision
    tower and projector are drawn from it; the language model is the embedded one, unchanged (its
    log-probs on text equal the embedded model's)."""
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip import CLIPImageProcessorPil

    directory = Path(directory)
    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODEL)
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    text_fields = json.loads((EMBEDDED_MODEL / "config.json").read_text())
    text_fields = {k: v for k, v in text_fields.items()
                   if k not in ("architectures", "torch_dtype", "model_type")}
    text_config = LlamaConfig(**{**text_fields, "vocab_size": len(tokenizer)})
    vision_config = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                                     num_hidden_layers=vision_layers, num_attention_heads=4,
                                     image_size=image_size, patch_size=patch_size)
    num_image_tokens = (image_size // patch_size) ** 2
    config = LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_id=image_token_id,
                         projector_hidden_act="gelu", vision_feature_select_strategy="default",
                         vision_feature_layer=-1, image_seq_length=num_image_tokens, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    _copy_embedded_language_model(model)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.bos_token_id]
    model.generation_config.pad_token_id = tokenizer.eos_token_id

    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                               vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                               image_token=IMAGE_TOKEN, num_additional_image_tokens=1)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    processor.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _copy_embedded_language_model(model: torch.nn.Module) -> None:
    """The embedded model's weights into the language model of ``model``; the rows of the added image
    placeholder in the embeddings and the head get the mean row (they are never read)."""
    from transformers import AutoModelForCausalLM

    text = AutoModelForCausalLM.from_pretrained(EMBEDDED_MODEL).state_dict()
    state = model.state_dict()
    with torch.no_grad():
        for key, value in text.items():
            target = ("lm_head.weight" if key == "lm_head.weight"
                      else "model.language_model." + key.removeprefix("model."))
            if target not in state:
                continue
            if key.endswith("embed_tokens.weight") or key == "lm_head.weight":
                state[target][: value.shape[0]] = value
                state[target][value.shape[0] :] = value.mean(0)  # the placeholder's row (never read)
            else:
                state[target].copy_(value)
    model.load_state_dict(state)
    model.tie_weights()
