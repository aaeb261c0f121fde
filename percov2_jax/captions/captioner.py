"""Optional BLIP-2 captioning (PyTorch, through transformers), from a local weights folder only.

  captioner = Blip2Captioner("/models/blip2-opt-2.7b")   # a folder saved with save_pretrained
  text = captioner.caption_for("kodim01.png")

It never downloads: the folder must hold the model (``config.json`` and weights) and the
processor (tokenizer and image-processor files), and loading passes ``local_files_only=True``.
torch and transformers are imported when a captioner is made, so the package imports without
them. PerCo generated captions with BLIP-2 at ``max_length=32``; here the default is at most 32
new tokens with greedy decoding (``generate_kwargs`` changes that).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any


class Blip2Captioner:
    """Captions images with a local BLIP-2 checkpoint.

    Args:
      path: str | PathLike, a folder written by ``Blip2ForConditionalGeneration.save_pretrained``
        and ``Blip2Processor.save_pretrained`` (for example a snapshot of a BLIP-2 model repo).
      max_new_tokens: int, the cap on generated tokens.
      device: str, a torch device ("cpu", "cuda").
      dtype: str | None, a torch dtype name ("float16", ...); None keeps the checkpoint's.
      generate_kwargs: dict | None, more arguments for ``model.generate`` (e.g. ``num_beams``).
    Raises:
      FileNotFoundError if ``path`` is not a folder with a ``config.json``; ImportError without
      torch/transformers; ValueError if the folder does not load as a BLIP-2 model and processor.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        max_new_tokens: int = 32,
        device: str = "cpu",
        dtype: str | None = None,
        generate_kwargs: dict[str, Any] | None = None,
    ):
        self.path = pathlib.Path(path).expanduser()
        if not self.path.is_dir():
            raise FileNotFoundError(
                f"BLIP-2 weights folder {str(self.path)!r} does not exist (the captioner never downloads: "
                "give a local folder saved with save_pretrained, or supply captions instead)"
            )
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"BLIP-2 weights folder {str(self.path)!r} has no config.json")
        try:
            import torch
            import transformers
        except ImportError as e:
            raise ImportError(
                f"BLIP-2 captioning needs torch and transformers ({e}); install them or supply captions instead"
            ) from e
        self._torch = torch
        self.max_new_tokens = int(max_new_tokens)
        self.device = device
        self.generate_kwargs = dict(generate_kwargs or {})
        options: dict[str, Any] = {"local_files_only": True}
        if dtype is not None:
            options["dtype"] = getattr(torch, dtype)
        try:
            self.processor = transformers.Blip2Processor.from_pretrained(self.path, local_files_only=True)
            self.model = transformers.Blip2ForConditionalGeneration.from_pretrained(self.path, **options)
        except Exception as e:  # noqa: BLE001 - the loaders raise many types for a bad folder
            raise ValueError(f"{self.path} does not load as a BLIP-2 model and processor: {e}") from e
        self.model.to(device).eval()

    def caption(self, image) -> str:
        """The caption of ``image`` (a PIL image or a ``uint8 [H, W, 3]`` array), stripped."""
        import numpy as np
        from PIL import Image

        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image, dtype=np.uint8))
        inputs = self.processor(images=image.convert("RGB"), return_tensors="pt").to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": False, **self.generate_kwargs}
        with self._torch.no_grad():
            ids = self.model.generate(**inputs, **kwargs)
        return self.processor.batch_decode(ids, skip_special_tokens=True)[0].strip()

    def caption_for(self, image_path: str | os.PathLike) -> str:
        """The caption of the image file at ``image_path``."""
        from PIL import Image

        with Image.open(image_path) as image:
            return self.caption(image.convert("RGB"))
