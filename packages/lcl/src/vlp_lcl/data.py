"""LCL's sample adapter: image-caption pairs and MMC4-style interleaved documents -> one token sequence each.

An image becomes the span ``<soi> <img> x P <eoi>`` (P = ViT patch count); the three special ids are
appended after the tokenizer's vocabulary (:class:`SpecialIds`). The two sample kinds are told apart by
their members: a ``json`` with ``text_list`` is a document (images under the member names its
``image_info`` entries give), anything else is a pair (an image member plus a caption).

- Pair: image-first ``<soi> img <eoi> caption <eot>`` with probability ``img_first_prob`` (captioning; no
  contrastive pair, no preceding context), else text-first ``<bos> caption <soi> img <eoi>``.
- Document: images with ``matched_sim >= sim_threshold``, sorted by ``matched_text_index``, one random
  image per sentence, the first ``max_images``; each goes before or after its sentence; ``<bos> ... <eot>``,
  truncated to the context length without ever cutting an image span (later images are dropped).

Every image carries an explicit ``has_context`` flag: at least ``min_context_tokens`` text tokens precede
it. Ids the tokenizer produces for special-token strings inside raw text (``[EOT]``, ``<|endoftext|>``, ...)
are dropped, and the image-span ids can never come from text (they lie outside the tokenizer's vocabulary),
so raw text cannot shift an image splice.

``collate`` returns a batch whose every field is row-major (legend: B rows, L longest row, M most images
in a row): ``images`` uint8 [B,M,3,S,S] (row b's images first, zero padding after them), ``tokens`` [B,L],
``labels`` [B,L] (next-token targets, -100 for image, <eoi> and pad targets), ``has_context`` [B,M] bool
(False on padding), and two host lists of B lists: ``soi_pos`` (row positions of each image's <soi>, in span
order) and ``gen_pos`` (row positions with a target). So any row slice of a batch is a batch (the core's
accumulation chunks, :func:`vlp_core.train.accumulate.split_batch`), and the model builds its flat indices
from the host lists: the training step never synchronises to find them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from vlp_core.data.adapters import parse_json, read_caption, read_image, seeded_augment
from vlp_core.data.transforms import ImageDecodeError, build_transform, decode_image
from vlp_core.method import SkipSample
from vlp_lcl.config import LclConfig

__all__ = ["SpecialIds", "LclAdapter", "assemble", "IGNORE"]

IGNORE = -100


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the image-span tokens (after the tokenizer's vocabulary) and of the tokenizer's own specials."""

    soi: int
    img: int
    eoi: int
    bos: int | None
    eot: int
    pad: int

    @classmethod
    def for_tokenizer(cls, tokenizer: Any) -> SpecialIds:
        v = int(tokenizer.vocab_size)
        return cls(soi=v, img=v + 1, eoi=v + 2, bos=tokenizer.bos_id, eot=tokenizer.eot_id, pad=tokenizer.pad_id)

    @property
    def vocab_size(self) -> int:
        """Tokenizer vocabulary plus the three image-span tokens."""
        return self.eoi + 1


def assemble(
    segments: list[tuple[str, Any]], *, ids: SpecialIds, num_image_tokens: int, context_length: int,
    start: bool, end: bool, min_context_tokens: int,
) -> tuple[list[int], list[Any], list[bool]]:
    """Lay out text segments ``("text", ids)`` and images ``("image", ref)`` as one sequence.

    Text is truncated to fit; an image span that does not fit whole ends the sequence (it and everything after
    it are dropped). ``start`` prepends BOS (when the tokenizer has one), ``end`` appends EOT (always kept).

    Returns:
        ``(token ids, refs of the images kept in span order, has_context per kept image)``.
    """
    out: list[int] = [ids.bos] if start and ids.bos is not None else []
    room = context_length - (1 if end else 0)
    span = num_image_tokens + 2
    kept: list[Any] = []
    has_context: list[bool] = []
    text_tokens = 0
    for kind, value in segments:
        if kind == "text":
            take = value[: max(room - len(out), 0)]
            out += take
            text_tokens += len(take)
            if len(take) < len(value):
                break
        else:
            if len(out) + span > room:
                break
            # min_context_tokens=0 reproduces the official position rule (anything before the <soi>).
            has_context.append(text_tokens >= min_context_tokens if min_context_tokens > 0 else len(out) > 0)
            out += [ids.soi] + [ids.img] * num_image_tokens + [ids.eoi]
            kept.append(value)
    if end:
        out.append(ids.eot)
    return out, kept, has_context


class LclAdapter:
    """Raw webdataset sample (pair or document) -> ``{"ids", "images", "has_context"}``; see module doc."""

    def __init__(self, tokenizer: Any, cfg: LclConfig, *, image_size: int, num_image_tokens: int,
                 context_length: int, augment: bool = False, interpolation: str = "bilinear") -> None:
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.ids = SpecialIds.for_tokenizer(tokenizer)
        self.P = num_image_tokens
        self.context_length = context_length
        if context_length < num_image_tokens + 4:
            raise ValueError(
                f"model.text.context_length {context_length} cannot hold one image span of "
                f"{num_image_tokens} visual tokens plus 4 special tokens"
            )
        self.keys = [k.strip() for k in cfg.caption_keys.split(",") if k.strip()]
        if not self.keys:
            raise ValueError("loss.caption_keys is empty")
        self.transform = build_transform(image_size, train=True, augment=augment, interpolation=interpolation)
        self.augment = augment
        # Ids that must never come from raw text: the tokenizer's own specials (a literal "[EOT]" or
        # "<|endoftext|>" in a web page would otherwise end the sequence early).
        self._banned = {i for i in (self.ids.bos, self.ids.eot, self.ids.pad) if i is not None}

    # -- text and images ----------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Plain ids of ``text`` with every special id removed (special-token strings neutralised)."""
        return [i for i in self.tokenizer.encode(text) if i not in self._banned and i < self.ids.soi]

    def _image(self, data: bytes, rng: random.Random) -> torch.Tensor:
        with seeded_augment(rng, self.augment):
            return self.transform(decode_image(data))

    # -- samples -------------------------------------------------------------------------------------------

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        rng = random.Random(sample.get("__seed__", 0))
        meta = parse_json(sample) if sample.get("json") else {}
        if isinstance(meta, dict) and "text_list" in meta:
            return self.document(sample, meta, rng)
        return self.pair(sample, rng)

    def pair(self, sample: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        caption = read_caption(sample, rng.choice(self.keys), rng)
        with seeded_augment(rng, self.augment):
            image = read_image(sample, self.transform)
        text = self.encode(caption)[: self.context_length - self.P - 4]
        image_first = rng.random() < self.cfg.img_first_prob
        if image_first:
            segments, start, end = [("image", 0), ("text", text)], False, True
        else:
            segments, start, end = [("text", text), ("image", 0)], True, False
        ids, kept, has_context = assemble(
            segments, ids=self.ids, num_image_tokens=self.P, context_length=self.context_length, start=start,
            end=end, min_context_tokens=self.cfg.min_context_tokens)
        return {"ids": ids, "images": [image], "has_context": has_context}

    def _select_images(self, sample: dict[str, Any], meta: dict[str, Any], n_text: int,
                       rng: random.Random) -> dict[int, str]:
        """Sentence index -> image member name, after the similarity filter, one image per sentence, the cap."""
        infos = meta.get("image_info")
        if not isinstance(infos, list):
            raise SkipSample("bad_document", "json.image_info is not a list")
        by_sentence: dict[int, list[str]] = {}
        for info in infos:
            if not isinstance(info, dict):
                raise SkipSample("bad_document", "json.image_info holds a non-object entry")
            name, idx, sim = info.get("image_name"), info.get("matched_text_index"), info.get("matched_sim", 0.0)
            if not isinstance(idx, int) or not 0 <= idx < n_text:
                raise SkipSample("bad_document", f"image_info matched_text_index {idx!r} outside text_list")
            if not isinstance(sim, (int, float)) or sim < self.cfg.sim_threshold:
                continue
            if not isinstance(name, str) or name not in sample:
                continue  # the image was not downloaded: MMC4 documents often miss some
            by_sentence.setdefault(idx, []).append(name)
        chosen = {i: rng.choice(names) for i, names in sorted(by_sentence.items())}
        return dict(list(chosen.items())[: self.cfg.max_images])

    def document(self, sample: dict[str, Any], meta: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        texts = meta.get("text_list")
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise SkipSample("bad_document", "json.text_list is not a list of strings")
        chosen = self._select_images(sample, meta, len(texts), rng)
        images: dict[str, torch.Tensor] = {}
        for name in chosen.values():
            try:
                images[name] = self._image(sample[name], rng)
            except ImageDecodeError:
                continue  # an image that fails to load is skipped, the document is kept
        segments: list[tuple[str, Any]] = []
        for i, sentence in enumerate(texts):
            name = chosen.get(i)
            before = name in images and rng.random() < self.cfg.image_before_prob
            if before:
                segments.append(("image", name))
            segments.append(("text", self.encode(sentence)))
            if name in images and not before:
                segments.append(("image", name))
        ids, kept, has_context = assemble(
            segments, ids=self.ids, num_image_tokens=self.P, context_length=self.context_length, start=True,
            end=True, min_context_tokens=self.cfg.min_context_tokens)
        if len(kept) < self.cfg.min_images:
            raise SkipSample("too_few_images", f"{len(kept)} usable image(s) in the context length, "
                             f"need {self.cfg.min_images}")
        return {"ids": ids, "images": [images[n] for n in kept], "has_context": has_context}

    # -- batches -------------------------------------------------------------------------------------------

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        ids_sp = self.ids
        L = max(len(s["ids"]) for s in samples)
        M = max(len(s["images"]) for s in samples)
        B = len(samples)
        tokens = torch.full((B, L), ids_sp.pad, dtype=torch.long)
        labels = torch.full((B, L), IGNORE, dtype=torch.long)
        images = torch.zeros((B, M, *samples[0]["images"][0].shape), dtype=samples[0]["images"][0].dtype)
        has_context = torch.zeros((B, M), dtype=torch.bool)
        soi_pos: list[list[int]] = []
        gen_pos: list[list[int]] = []
        for b, s in enumerate(samples):
            row = torch.tensor(s["ids"], dtype=torch.long)
            n = row.numel()
            tokens[b, :n] = row
            nxt = row[1:]
            keep = (nxt != ids_sp.img) & (nxt != ids_sp.eoi)
            labels[b, : n - 1] = torch.where(keep, nxt, torch.full_like(nxt, IGNORE))
            k = len(s["images"])
            if k:
                images[b, :k] = torch.stack(s["images"])
                has_context[b, :k] = torch.tensor(s["has_context"], dtype=torch.bool)
            soi_pos.append((row == ids_sp.soi).nonzero().flatten().tolist())
            gen_pos.append((labels[b] != IGNORE).nonzero().flatten().tolist())
            if len(soi_pos[-1]) != k or int((row == ids_sp.img).sum()) != k * self.P:
                raise RuntimeError(  # an internal invariant: assemble() writes whole spans only
                    f"image spans ({len(soi_pos[-1])}) and images ({k}) of a row disagree")
        return {"images": images, "tokens": tokens, "labels": labels, "has_context": has_context,
                "soi_pos": soi_pos, "gen_pos": gen_pos}
