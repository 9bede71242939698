"""RegionGPT: the PyTorch reference model.

    model = RGPT(RGPTConfig.from_preset("tiny"))                  # random weights
    model = RGPT.from_pretrained("ckpt/")                         # a save_pretrained folder
    model = RGPT.from_components("clip-vit-l-336/", "vicuna-7b/") # local CLIP + LLaMA folders
    model.answer(image, [mask], "Describe in detail the object located at <region1> in the image.")

Stages (DESIGN.md §1):
    pixels [B,3,S,S] -> VisionTower -> [B,g,g,C] -> Refinement -> hires [B,4g,4g,C]
    hires -> patch_merge -> [B,g*g,C] -> Connector -> image embeddings [B,g*g,D]
    hires, masks -> mask pooling -> [N,C] -> Connector -> region embeddings [N,D]
    embeddings spliced at <image> / <region> tokens -> LlamaForCausalLM
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import nn
from transformers import GenerationConfig, LlamaForCausalLM

from rgpt_rt.atomic import atomic_directory
from rgpt_rt.config import RGPTConfig
from rgpt_rt.inputs import ImageLike, MaskLike, load_image, load_mask, pad_mask, preprocess_image
from rgpt_rt.model.connector import Connector
from rgpt_rt.model.llm import build_llm, hf_from_pretrained, read_llama_config
from rgpt_rt.model.region import Refinement, patch_merge
from rgpt_rt.model.vision import VisionTower, read_clip_vision_config
from rgpt_rt.ops import add_region_numbers, add_region_positions, mask_pool_reference
from rgpt_rt.prompts import Conversation, tokenize_conversation
from rgpt_rt.tokenizer import default_tokenizer, ensure_special_tokens, load_tokenizer

CHECKPOINT_FORMAT = "rgpt_rt.checkpoint"
CHECKPOINT_VERSION = 1
# What save_pretrained writes; from_pretrained refuses a folder missing any of them.
CHECKPOINT_FILES = (
    "config.json",
    "tokenizer.json",
    "rgpt.safetensors",
    "vision/config.json",
    "llm/config.json",
)


@dataclass
class RGPTOutput:
    logits: torch.Tensor  # [B, T, vocab]
    loss: torch.Tensor | None = None


@dataclass
class PreparedInputs:
    """One image and its masks, ready for the model (what `RGPT.prepare` returns)."""

    pixel_values: torch.Tensor  # [1, 3, S, S]
    masks: torch.Tensor  # [N, S', S'] bool, padded like the image
    input_ids: torch.Tensor  # [1, T]
    region_index: torch.Tensor  # [R] mask index of each region token


class RGPT(nn.Module):
    def __init__(
        self,
        config: RGPTConfig,
        tokenizer: Tokenizer | None = None,
        *,
        vision: VisionTower | None = None,
        llm: LlamaForCausalLM | None = None,
    ):
        super().__init__()
        self.config = config
        channels, hidden = config.vision.hidden_size, config.llm.hidden_size
        self.vision = vision if vision is not None else VisionTower(config.vision)
        self.refinement = Refinement(channels, config.refinement.layer_norm_eps)
        self.connector = Connector(
            channels, hidden, config.connector.region_numbers, config.connector.region_positions
        )
        self.llm = llm if llm is not None else build_llm(config.llm)
        self.tokenizer = ensure_special_tokens(
            tokenizer or default_tokenizer(tokens=config.tokens), config.tokens
        )
        self._resolve_token_ids()

    def _resolve_token_ids(self) -> None:
        tok, names = self.tokenizer, self.config.tokens
        self.image_token_id = tok.token_to_id(names.image)
        self.region_token_id = tok.token_to_id(names.region)
        self.bos_token_id = tok.token_to_id(names.bos)
        self.eos_token_id = tok.token_to_id(names.eos)
        pad = tok.token_to_id(names.pad)
        self.pad_token_id = pad if pad is not None else self.eos_token_id
        vocab = self.config.llm.vocab_size
        for name in ("bos", "eos", "pad"):
            token_id = getattr(self, f"{name}_token_id")
            if token_id >= vocab:
                raise ValueError(
                    f"the tokenizer's {name} id {token_id} does not fit the LLM's vocabulary of {vocab}"
                )

    # --- the stages ---------------------------------------------------------------------
    def encode_image(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values [B, 3, S, S] -> (image_embeds [B, g*g, D], hires [B, 4g, 4g, C])."""
        size = self.config.vision.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(
                f"pixel_values must be [B, 3, {size}, {size}]; got {tuple(pixel_values.shape)}"
            )
        grid = self.vision(pixel_values.to(self._vision_dtype()))  # [B, g, g, C]
        hires = self.refinement(grid.to(self._refinement_dtype()))  # [B, 4g, 4g, C]
        merged = patch_merge(hires, self.config.vision.grid)  # [B, g*g, C]
        return self.connector(merged), hires

    def pool_regions(
        self, hires: torch.Tensor, masks: torch.Tensor, batch_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """hires [B, 4g, 4g, C], masks [N, Hm, Wm] (any size; same field of view as the padded
        image), batch_index [N] -> pooled region features [N, C] (before the connector)."""
        return mask_pool_reference(hires, masks, batch_index, mode=self.config.pool_mode)

    def encode_regions(
        self, hires: torch.Tensor, masks: torch.Tensor, batch_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """As pool_regions, then the connector -> region embeddings [N, D], each with its
        number's vector where the model has them (the k-th mask of a sample is <region{k+1}>)
        and its centroid's projection where it has that."""
        embeds = self.connector(self.pool_regions(hires, masks, batch_index))
        if self.config.connector.region_positions:
            embeds = add_region_positions(embeds, masks, self.connector.region_position.weight)
        if self.config.connector.region_numbers:
            embeds = add_region_numbers(embeds, self.connector.region_number, batch_index)
        return embeds

    def build_inputs_embeds(
        self, input_ids: torch.Tensor, image_embeds: torch.Tensor, region_embeds: torch.Tensor
    ) -> torch.Tensor:
        """Token embeddings with the image embeddings placed at the <image> tokens and the region
        embeddings at the <region> tokens, both in row-major order.
        input_ids [B, T]; image_embeds [B, g*g, D]; region_embeds [R, D] (R = number of region tokens)."""
        image_slots = input_ids == self.image_token_id
        region_slots = input_ids == self.region_token_id
        per_row = image_slots.sum(dim=1)
        expected = self.config.num_image_tokens
        if bool((per_row != expected).any()):
            raise ValueError(
                f"each sequence needs exactly {expected} image tokens; got {per_row.tolist()}"
            )
        if int(region_slots.sum()) != region_embeds.shape[0]:
            raise ValueError(
                f"the prompt holds {int(region_slots.sum())} region tokens but {region_embeds.shape[0]} region embeddings were given"
            )
        placeholders = image_slots | region_slots
        embeds = self.llm.get_input_embeddings()(
            input_ids.masked_fill(placeholders, 0)
        )  # [B, T, D]
        embeds = embeds.clone()
        embeds[image_slots] = image_embeds.reshape(-1, image_embeds.shape[-1]).to(embeds.dtype)
        embeds[region_slots] = region_embeds.to(embeds.dtype)
        return embeds

    def inputs_embeds(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        masks: torch.Tensor,
        batch_index: torch.Tensor | None = None,
        region_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The decoder's input [B, T, D]: image, regions and text embedded (forward's arguments)."""
        image_embeds, hires = self.encode_image(pixel_values)
        regions = self.encode_regions(hires, masks, batch_index)  # [N, D]
        if region_index is not None:
            regions = regions[region_index]
        return self.build_inputs_embeds(input_ids, image_embeds, regions)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        masks: torch.Tensor,
        batch_index: torch.Tensor | None = None,
        region_index: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> RGPTOutput:
        """pixel_values [B,3,S,S]; input_ids [B,T]; masks [N,Hm,Wm] with batch_index [N] (image of
        each mask); region_index [R]: the mask of each region token in row-major order (default:
        token k takes mask k); labels [B,T] with -100 where no loss is taken."""
        embeds = self.inputs_embeds(pixel_values, input_ids, masks, batch_index, region_index)
        out = self.llm(
            inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, use_cache=False
        )
        return RGPTOutput(logits=out.logits, loss=out.loss)

    # --- training helpers -----------------------------------------------------------------
    def set_trainable(self, *, vision: bool, llm: bool) -> None:
        """Refinement and connector always train; the vision tower and the LLM when asked
        (stage 1: neither; stage 2: the LLM)."""
        self.vision.requires_grad_(vision)
        self.llm.requires_grad_(llm)
        self.refinement.requires_grad_(True)
        self.connector.requires_grad_(True)

    # --- the reference pipeline -------------------------------------------------------------
    def prepare(self, image: ImageLike, masks: Sequence[MaskLike], question: str) -> PreparedInputs:
        """Load and check an image, its masks and a question with <regionK> placeholders."""
        pixels = load_image(image)
        if len(masks) == 0:
            raise ValueError("give at least one mask (or box) for the question's regions")
        loaded = [load_mask(mask, pixels.shape[:2], index) for index, mask in enumerate(masks)]
        tokens = tokenize_conversation(
            self.tokenizer,
            Conversation.single(question),
            num_regions=len(loaded),
            num_image_tokens=self.config.num_image_tokens,
            tokens=self.config.tokens,
        )
        return PreparedInputs(
            pixel_values=preprocess_image(pixels, self.config.vision)[None],
            masks=torch.from_numpy(np.stack([pad_mask(m) for m in loaded])),
            input_ids=torch.tensor([tokens.input_ids], dtype=torch.int64),
            region_index=torch.tensor(tokens.region_order, dtype=torch.int64),
        )

    @torch.no_grad()
    def answer_ids(self, prepared: PreparedInputs, max_new_tokens: int = 64) -> list[int]:
        """Greedy answer token ids (without the final eos) from transformers' generate."""
        device = self._device()
        image_embeds, hires = self.encode_image(prepared.pixel_values.to(device))
        regions = self.encode_regions(hires, prepared.masks.to(device))[
            prepared.region_index.to(device)
        ]
        input_ids = prepared.input_ids.to(device)
        embeds = self.build_inputs_embeds(input_ids, image_embeds, regions)
        out = self.llm.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones_like(input_ids),
            generation_config=self.greedy_generation(max_new_tokens),
        )
        return self.until_eos(out[0].tolist())

    def greedy_generation(self, max_new_tokens: int) -> GenerationConfig:
        """transformers' generation config of the reference pipeline: greedy, this model's tokens."""
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
        )

    def until_eos(self, ids: list[int]) -> list[int]:
        """Generated ids up to (without) the first eos."""
        return ids[: ids.index(self.eos_token_id)] if self.eos_token_id in ids else ids

    def answer(
        self, image: ImageLike, masks: Sequence[MaskLike], question: str, max_new_tokens: int = 64
    ) -> str:
        """The reference end-to-end answer: greedy, built on transformers generation.
        image: path, PIL image or [H, W, 3] uint8; masks: [H, W] bool/uint8 arrays (or boxes);
        question: text with <region1>..<regionN> placeholders."""
        was_training = self.training
        self.eval()
        try:
            ids = self.answer_ids(self.prepare(image, masks, question), max_new_tokens)
        finally:
            self.train(was_training)
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    # --- save and load --------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> None:
        """config.json, tokenizer.json, rgpt.safetensors (refinement + connector), vision/ and
        llm/ (transformers folders). Written to a temporary folder and renamed into place."""
        with atomic_directory(folder) as tmp:
            meta = {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "config": self.config.to_dict(),
            }
            (tmp / "config.json").write_text(json.dumps(meta, indent=2))
            self.tokenizer.save(str(tmp / "tokenizer.json"))
            own = {f"refinement.{k}": v for k, v in self.refinement.state_dict().items()}
            own.update({f"connector.{k}": v for k, v in self.connector.state_dict().items()})
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in own.items()},
                str(tmp / "rgpt.safetensors"),
            )
            self.vision.clip.save_pretrained(str(tmp / "vision"))
            self.llm.save_pretrained(str(tmp / "llm"))

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype | None = None) -> RGPT:
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
        missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"checkpoint folder {folder} is missing {', '.join(missing)}; it needs every file RGPT.save_pretrained writes"
            )
        meta = json.loads((folder / "config.json").read_text())
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"{folder}/config.json is not an rgpt_rt checkpoint config (format {meta.get('format')!r})"
            )
        config = RGPTConfig.from_dict(meta["config"])
        from transformers import CLIPVisionModel

        vision = VisionTower(
            config.vision, hf_from_pretrained(CLIPVisionModel, folder / "vision", dtype)
        )
        llm = hf_from_pretrained(LlamaForCausalLM, folder / "llm", dtype)
        model = cls(config, load_tokenizer(folder / "tokenizer.json"), vision=vision, llm=llm)
        own = load_file(str(folder / "rgpt.safetensors"))
        model.refinement.load_state_dict(_section(own, "refinement"))
        model.connector.load_state_dict(_section(own, "connector"))
        if dtype is not None:
            model.refinement.to(dtype)
            model.connector.to(dtype)
        return model

    @classmethod
    def from_components(
        cls,
        clip_dir: str | Path,
        llm_dir: str | Path,
        dtype: torch.dtype | None = None,
        pool_mode: str = "area",
    ) -> RGPT:
        """The full model from a local CLIP folder and a local LLaMA/Vicuna folder (no download);
        refinement and connector are new (randomly initialised)."""
        clip_dir, llm_dir = Path(clip_dir), Path(llm_dir)
        for name, path in (("CLIP", clip_dir), ("LLM", llm_dir)):
            if not path.is_dir():
                raise FileNotFoundError(f"{name} folder {path} does not exist")
        vision_cfg = read_clip_vision_config(clip_dir)
        llm_cfg = read_llama_config(llm_dir)
        config = RGPTConfig(
            vision=vision_cfg, llm=llm_cfg, pool_mode=pool_mode, name="from-components"
        )
        tokenizer = _llm_tokenizer(llm_dir)
        from transformers import CLIPVisionModel

        vision = VisionTower(config.vision, hf_from_pretrained(CLIPVisionModel, clip_dir, dtype))
        llm = hf_from_pretrained(LlamaForCausalLM, llm_dir, dtype)
        model = cls(config, tokenizer, vision=vision, llm=llm)
        if dtype is not None:
            model.refinement.to(dtype)
            model.connector.to(dtype)
        return model

    # --- internals --------------------------------------------------------------------------
    def _device(self) -> torch.device:
        return self.connector.fc1.weight.device

    def _vision_dtype(self) -> torch.dtype:
        return next(self.vision.parameters()).dtype

    def _refinement_dtype(self) -> torch.dtype:
        return self.refinement.up1.weight.dtype


def _section(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}


def _llm_tokenizer(llm_dir: Path) -> Tokenizer:
    """tokenizer.json when the folder has one; else converted by transformers from
    tokenizer.model (needs sentencepiece)."""
    if (llm_dir / "tokenizer.json").is_file():
        return load_tokenizer(llm_dir)
    if not (llm_dir / "tokenizer.model").is_file():
        raise FileNotFoundError(f"{llm_dir} has neither tokenizer.json nor tokenizer.model")
    from transformers import AutoTokenizer

    try:
        fast = AutoTokenizer.from_pretrained(str(llm_dir), use_fast=True, local_files_only=True)
    except (ImportError, ValueError) as error:
        raise ValueError(
            f"could not convert {llm_dir}/tokenizer.model ({error}); install sentencepiece and protobuf, "
            "or save a tokenizer.json into the folder"
        ) from None
    return Tokenizer.from_str(fast.backend_tokenizer.to_str())
