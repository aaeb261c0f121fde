"""Optional captioning with a local transformers image-to-text model (PyTorch), e.g. BLIP-2.

  captioner = Captioner("/models/blip2-opt-2.7b")   # a folder saved with save_pretrained
  texts = captioner.captions([image_a, image_b])    # one batched generate call
  text = captioner.caption_for("kodim01.png")

`Captioner` loads any model that ``AutoModelForImageTextToText`` (``AutoModelForVision2Seq`` in
older transformers) loads — BLIP-2, BLIP, GIT, ViT-GPT2 (``VisionEncoderDecoderModel``), ... —
with its ``AutoProcessor``, or its image processor and tokenizer when the folder has no
processor class. `Blip2Captioner` loads a BLIP-2 folder with the BLIP-2 classes themselves.
Models that caption an image without a text prompt only: the processor gets images alone.

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


class Captioner:
    """Captions images with a local transformers image-to-text checkpoint.

    Args:
      path: str | PathLike, a folder written by the model's and the processor's
        ``save_pretrained`` (for example a snapshot of a model repo).
      max_new_tokens: int, the cap on generated tokens.
      device: str | None, a torch device ("cpu", "cuda"); None: "cuda" when available, else "cpu".
      dtype: str | None, a torch dtype name ("float16", ...); None keeps the checkpoint's.
      generate_kwargs: dict | None, more arguments for ``model.generate`` (e.g. ``num_beams``).
    Raises:
      FileNotFoundError if ``path`` is not a folder with a ``config.json``; ImportError without
      torch/transformers; ValueError if the folder does not load as a model and processor.
    """

    kind = "image-to-text"  # what the folder must hold, in messages

    def __init__(
        self,
        path: str | os.PathLike,
        max_new_tokens: int = 32,
        device: str | None = None,
        dtype: str | None = None,
        generate_kwargs: dict[str, Any] | None = None,
    ):
        self.path = pathlib.Path(path).expanduser()
        if not self.path.is_dir():
            raise FileNotFoundError(
                f"{self.kind} weights folder {str(self.path)!r} does not exist (the captioner never downloads: "
                "give a local folder saved with save_pretrained, or supply captions instead)"
            )
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"{self.kind} weights folder {str(self.path)!r} has no config.json")
        try:
            import torch
            import transformers
        except ImportError as e:
            raise ImportError(
                f"captioning needs torch and transformers ({e}); install them or supply captions instead"
            ) from e
        self._torch = torch
        self.max_new_tokens = int(max_new_tokens)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.generate_kwargs = dict(generate_kwargs or {})
        options: dict[str, Any] = {"local_files_only": True}
        if dtype is not None:
            options["dtype"] = getattr(torch, dtype)
        try:
            self.model, self._preprocess, self._decode = self._load(transformers, options)
        except Exception as e:  # noqa: BLE001 - the loaders raise many types for a bad folder
            raise ValueError(
                f"{self.path} does not load as {self._article} {self.kind} model and processor: {e}"
            ) from e
        self.model.to(self.device).eval()

    @property
    def _article(self) -> str:
        return "an" if self.kind[0].lower() in "aeiou" else "a"

    def _load(self, transformers, options):
        """(model, images -> model inputs, token ids -> texts) from the folder."""
        auto_model = getattr(transformers, "AutoModelForImageTextToText", None) or transformers.AutoModelForVision2Seq
        model = auto_model.from_pretrained(self.path, **options)
        processor = transformers.AutoProcessor.from_pretrained(self.path, local_files_only=True)
        if isinstance(processor, transformers.ProcessorMixin):
            return model, lambda images: processor(images=images, return_tensors="pt"), processor.batch_decode
        # No processor class (e.g. ViT-GPT2): AutoProcessor returned one part; load both.
        image_processor = transformers.AutoImageProcessor.from_pretrained(self.path, local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        return model, lambda images: image_processor(images=images, return_tensors="pt"), tokenizer.batch_decode

    def captions(self, images) -> list[str]:
        """The captions of ``images`` (PIL images or ``uint8 [H, W, 3]`` arrays) from one ``generate``
        call; each stripped, with whitespace runs made one space (a caption is one line)."""
        import numpy as np
        from PIL import Image

        images = [
            (image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))).convert(
                "RGB"
            )
            for image in images
        ]
        if not images:
            return []
        inputs = self._preprocess(images).to(self.device)
        for key, value in list(inputs.items()):
            if self._torch.is_tensor(value) and value.is_floating_point():
                inputs[key] = value.to(self.model.dtype)
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": False, **self.generate_kwargs}
        with self._torch.no_grad():
            ids = self.model.generate(**inputs, **kwargs)
        prompt = inputs.get("input_ids")
        if (
            prompt is not None
            and not self.model.config.is_encoder_decoder
            and ids.shape[1] >= prompt.shape[1]
            and self._torch.equal(ids[:, : prompt.shape[1]], prompt)
        ):
            ids = ids[:, prompt.shape[1] :]  # decoder-only models return the prompt first
        return [" ".join(text.split()) for text in self._decode(ids, skip_special_tokens=True)]

    def caption(self, image) -> str:
        """The caption of ``image`` (a PIL image or a ``uint8 [H, W, 3]`` array)."""
        return self.captions([image])[0]

    def captions_for(self, image_paths, batch_size: int = 8) -> list[str]:
        """The captions of the image files ``image_paths``, ``batch_size`` images per ``generate`` call."""
        from PIL import Image

        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        paths = list(image_paths)
        out: list[str] = []
        for start in range(0, len(paths), batch_size):
            images = []
            for p in paths[start : start + batch_size]:
                with Image.open(p) as image:
                    images.append(image.convert("RGB"))
            out += self.captions(images)
        return out

    def caption_for(self, image_path: str | os.PathLike) -> str:
        """The caption of the image file at ``image_path``."""
        return self.captions_for([image_path])[0]


class Blip2Captioner(Captioner):
    """`Captioner` for a BLIP-2 folder (``Blip2ForConditionalGeneration`` and ``Blip2Processor``
    ``save_pretrained``); any other folder is a ValueError."""

    kind = "BLIP-2"

    def _load(self, transformers, options):
        processor = transformers.Blip2Processor.from_pretrained(self.path, local_files_only=True)
        model = transformers.Blip2ForConditionalGeneration.from_pretrained(self.path, **options)
        return model, lambda images: processor(images=images, return_tensors="pt"), processor.batch_decode
