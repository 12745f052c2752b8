"""Stand-ins for processor classes that cannot load here: in transformers 5.25 the Qwen2-VL and
LLaVA-OneVision processor classes need torchvision (for their video half), preftune does not. Each holds
the family's image processor and the run's tokenizer, expands an image placeholder as the processor class
does, and saves what a model directory needs to load again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def image_processor_of(path: str, trust_remote_code: bool = False) -> Any:
    """The image processor saved in model directory ``path``."""
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)


class GridProcessor:
    """The image side of a Qwen2-VL processor, without the processor class (in transformers 5.25 it needs
    torchvision, for its video half): the image processor gives an image's patch grid (``image_grid_thw``,
    in patches), and the placeholder ``<|image_pad|>`` becomes t * h * w / merge**2 image tokens, one
    per merged patch (what the processor writes)."""

    def __init__(self, image_processor: Any, tokenizer: Any, image_token_id: int):
        self.image_processor, self.tokenizer = image_processor, tokenizer
        self.image_token = tokenizer.convert_ids_to_tokens(image_token_id)
        self.merge = int(image_processor.merge_size)
        self._grids: dict[tuple[int, int], tuple[int, int, int]] = {}

    def grid(self, size: tuple[int, int]) -> tuple[int, int, int]:
        """The merged patch grid (t, h, w) of an image of ``size`` (width, height)."""
        if size not in self._grids:
            from PIL import Image

            thw = self.image_processor(images=[Image.new("RGB", size)], return_tensors="pt")["image_grid_thw"]
            t, h, w = (int(v) for v in thw[0])
            self._grids[size] = (t, h // self.merge, w // self.merge)
        return self._grids[size]

    def save_pretrained(self, directory: str | Path) -> None:
        self.image_processor.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

    def __call__(self, text: str, images: list[Any]) -> dict[str, list[list[int]]]:
        t, h, w = self.grid(images[0].size)
        return {"input_ids": [self.tokenizer(text.replace(self.image_token, self.image_token * (t * h * w)))
                              ["input_ids"]]}


class OneVisionProcessor:
    """The image side of a LLaVA-OneVision processor. An image alone in its row fills any-resolution tiles
    (base tile + the unpadded grid + a newline per grid row, a count per image size, at most
    ``vision_aspect_ratio`` tiles); an image of a row with several fills its base tile and one newline. The
    counts come from the processor class's own rule (``LlavaOnevisionProcessor.replace_image_token``), run
    on an instance that holds only its image half and the settings of ``processor_config.json``."""

    SETTINGS = ("image_token", "num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio")

    def __init__(self, image_processor: Any, tokenizer: Any, directory: Path):
        from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

        path = directory / "processor_config.json"
        saved = json.loads(path.read_text()) if path.is_file() else {}
        if not isinstance(saved.get("num_image_tokens"), int):
            raise ValueError(f"config: model: {directory}: a llava_onevision model needs num_image_tokens in "
                             "its processor_config.json (the features of one image tile)")
        given = {k: saved[k] for k in self.SETTINGS if k in saved}
        self.settings = {"image_token": "<image>", "vision_feature_select_strategy": None,
                         "vision_aspect_ratio": "anyres_max_9", **given}
        rule = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)  # its __init__ loads the video half
        for key, value in self.settings.items():
            setattr(rule, key, value)
        rule.image_processor = image_processor
        self._rule, self.image_processor, self.tokenizer = rule, image_processor, tokenizer
        self.image_token = self.settings["image_token"]

    def save_pretrained(self, directory: str | Path) -> None:
        self.image_processor.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        values = {"processor_class": "LlavaOnevisionProcessor", **self.settings}
        (Path(directory) / "processor_config.json").write_text(json.dumps(values, indent=2) + "\n")

    def __call__(self, text: str, images: list[Any]) -> dict[str, list[list[int]]]:
        """``text`` (one row) with its k-th placeholder replaced by ``images[k]``'s image tokens."""
        inputs = self.image_processor(images=[list(images)], return_tensors="pt")
        pieces = text.split(self.image_token)
        if len(pieces) - 1 != len(images):
            raise ValueError(f"{len(images)} image(s) for {len(pieces) - 1} {self.image_token!r} "
                             "placeholder(s)")
        out = pieces[0]
        for k, piece in enumerate(pieces[1:]):
            out += self._rule.replace_image_token(inputs, k) + piece
        return {"input_ids": [self.tokenizer(out)["input_ids"]]}
