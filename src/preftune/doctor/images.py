"""Image checks of ``inspect``: how many images each row holds, their sizes, the same image in several
rows, images that cannot be read (bad rows naming ``images[i]``), and with an image-text model's inputs
(``--tokenizer`` or ``--model`` naming one) the tokens each image fills and the pairs whose images do not
fit ``max_prompt_length`` (training drops them). Only digests, sizes and counts are kept, never pixels."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from preftune.data.formats import PreferencePair
from preftune.data.images import ImageInputs, image_size
from preftune.doctor.stats import quantiles


@dataclass
class ImageChecks:
    """Accumulates the image checks pair by pair (``add``); ``summary()`` gives the findings."""

    inputs: ImageInputs | None = None  # the model's, for the tokens per image
    per_row: list[int] = field(default_factory=list)  # images of each usable pair
    first_row: dict[str, int] = field(default_factory=dict)  # image digest -> the first row holding it
    repeats: list[tuple[int, int]] = field(default_factory=list)  # (row, the earlier row with that image)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # digest -> (width, height)
    tokens: dict[str, int] = field(default_factory=dict)  # digest -> tokens its expansion fills
    too_long: list[int] = field(default_factory=list)  # rows whose images do not fit max_prompt_length

    def add(self, row: int, pair: PreferencePair) -> None:
        self.per_row.append(len(pair.images))
        for ref in pair.images:
            earlier = self.first_row.setdefault(ref.digest, row)
            if earlier != row:
                self.repeats.append((row, earlier))
            if ref.digest not in self.sizes:
                self.sizes[ref.digest] = image_size(ref)
                if self.inputs is not None:
                    # LLaVA-OneVision: an image in a row of several fills fewer tokens (ImageInputs.by_row)
                    self.tokens[ref.digest] = len(self.inputs.expansion(self.sizes[ref.digest],
                                                                        alone=len(pair.images) == 1))

    def summary(self, unreadable: dict[int, str]) -> dict[str, Any]:
        """``unreadable``: row -> message of the bad rows whose images could not be read."""
        per_row = np.array(self.per_row, dtype=np.int64)
        sizes = np.array(list(self.sizes.values()), dtype=np.int64).reshape(-1, 2)
        rows = sorted({r for r, _ in self.repeats})
        return {
            "rows_with_images": int((per_row > 0).sum()),
            "images": int(per_row.sum()),
            "unique_images": len(self.sizes),
            "images_per_row": quantiles(per_row[per_row > 0]),
            "repeated_images": {"rows": rows, "of": [dict(self.repeats)[r] for r in rows]},
            "width": quantiles(sizes[:, 0]),
            "height": quantiles(sizes[:, 1]),
            "unreadable": {"rows": sorted(unreadable),
                           "messages": [unreadable[r] for r in sorted(unreadable)]},
            "tokens_per_image": quantiles(np.array(list(self.tokens.values()))) if self.tokens else None,
            "too_long": {"rows": self.too_long},
        }


def unreadable_rows(bad_rows: dict[str, list]) -> dict[int, str]:
    """The bad rows (``TextChecks.summary()["bad_rows"]``) whose message names an image field."""
    return {row: message for row, message in zip(bad_rows["rows"], bad_rows["messages"])
            if "field 'images" in message}


def images_section(s: dict[str, Any]) -> list[str]:
    """The report's images section (nothing for a file without images)."""
    if not s or not s["images"]:
        return []
    size = (f"{s['width']['min']:.0f}-{s['width']['max']:.0f} x {s['height']['min']:.0f}-"
            f"{s['height']['max']:.0f} px (median {s['width']['median']:.0f} x {s['height']['median']:.0f})")
    repeated, unreadable = s["repeated_images"], s["unreadable"]
    lines = ["", "## Images", "",
             f"{s['images']} images in {s['rows_with_images']} rows ({s['unique_images']} distinct; at most "
             f"{s['images_per_row']['max']:.0f} in a row), {size}.",
             f"Images repeated from an earlier row: {len(repeated['rows'])} rows"
             + (f" ({', '.join(f'{r} of {o}' for r, o in zip(repeated['rows'][:8], repeated['of'][:8]))})"
                if repeated["rows"] else "") + ".",
             f"Missing or unreadable (bad rows: training stops at the first): {len(unreadable['rows'])}"
             + (f"; {unreadable['messages'][0]}" if unreadable["rows"] else "") + "."]
    tokens = s.get("tokens_per_image")
    if tokens:
        lines.append(f"Tokens per image (the model's expansion): median {tokens['median']:.0f}, max "
                     f"{tokens['max']:.0f}. Pairs whose images do not fit max_prompt_length (training drops "
                     f"them): {len(s['too_long']['rows'])}"
                     + (f" (rows {', '.join(map(str, s['too_long']['rows'][:8]))})" if s["too_long"]["rows"]
                        else "") + ".")
    return lines
