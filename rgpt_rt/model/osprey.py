"""Osprey (CVPR 2024): the PyTorch reference model of the osprey family.

    model = Osprey(RGPTConfig.from_preset("osprey-narrow"))                   # random weights
    model = Osprey.from_files("Osprey-7b/", "open_clip_pytorch_model.bin")    # the public checkpoint
    model.answer(image, [mask], "Can you give me a detailed description of <region1>?")

What it computes (Osprey's osprey/model/*.py, transcribed; docs/osprey.md):
    pixels [B,3,512,512] -> ConvNeXt trunk -> res2..res5 [B,C_l,S/s_l,S/s_l]   s_l = 4, 8, 16, 32
    res4 flattened [B,1024,768] -> mm_projector (Linear-GELU-Linear) -> image embeddings [B,1024,D]
    per mask, per level: mask bilinearly resized to the level, > 0, features averaged over it
        (sum / (count + 1e-8)) -> Linear(C_l, 1024); summed over levels -> feat_linear -> <mask> [D]
    the mask resized bilinearly to 112x112, flattened -> 3-layer ReLU MLP -> <pos> [D]
    the LLM (LlamaForCausalLM, Vicuna-7B v1.5) with <mask><pos> per region in the prompt
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer
from torch import nn
from transformers import GenerationConfig, LlamaForCausalLM

from rgpt_rt.config import RGPTConfig
from rgpt_rt.inputs import ImageLike, MaskLike, load_image, load_mask
from rgpt_rt.model.convnext import ConvNeXtTrunk
from rgpt_rt.model.llm import build_llm
from rgpt_rt.prompts import OSPREY_TEMPLATE, Conversation, tokenize_conversation
from rgpt_rt.tokenizer import default_tokenizer, ensure_special_tokens


class ReluMLP(nn.Module):
    """Osprey's MLP: `layers` Linear layers, ReLU between them (not after the last)."""

    def __init__(self, widths: Sequence[int]):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class MaskExtractor(nn.Module):
    """Two embeddings per mask: <mask> from the four pooled levels, <pos> from its shape."""

    def __init__(self, dims: Sequence[int], embed_dim: int, hidden: int, mask_size: int):
        super().__init__()
        self.mask_size = mask_size
        for level, channels in enumerate(dims):  # res2..res5, Osprey's attribute names
            setattr(self, f"res{level + 2}", nn.Linear(channels, embed_dim))
        self.feat_linear = nn.Linear(embed_dim, hidden)
        self.mask_linear = ReluMLP([mask_size * mask_size, embed_dim, embed_dim, hidden])

    def forward(self, levels: Sequence[torch.Tensor], masks: torch.Tensor) -> torch.Tensor:
        """levels: res2..res5 of ONE image, each [C_l, H_l, W_l]; masks [N, Hm, Wm] (any size,
        the image's field of view) -> [N, 2, D]: the <mask> and <pos> embeddings."""
        masks = masks.float()[None]  # [1, N, Hm, Wm]
        summed = 0
        for level, feature in enumerate(levels):
            pooled = mask_average(feature[None].float(), masks)[0]  # [N, C_l]
            linear = getattr(self, f"res{level + 2}")
            summed = summed + linear(pooled.to(linear.weight.dtype))
        mask_embeds = self.feat_linear(summed)  # [N, D]
        small = F.interpolate(masks, size=self.mask_size, mode="bilinear", align_corners=False)
        pos = self.mask_linear(small[0].flatten(1).to(self.feat_linear.weight.dtype))  # [N, D]
        return torch.stack([mask_embeds, pos], dim=1)


def mask_average(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """features [B, C, H, W], masks [B, N, Hm, Wm] -> [B, N, C]: each mask resized bilinearly to
    H x W (unless it is that size), binarised by > 0, and the features averaged over it."""
    if masks.shape[-2:] != features.shape[-2:]:
        masks = F.interpolate(masks, size=features.shape[-2:], mode="bilinear", align_corners=False)
    binary = (masks > 0).to(masks.dtype)
    weights = binary / (binary.sum(dim=(-1, -2), keepdim=True) + 1e-8)
    return torch.einsum("bchw,bnhw->bnc", features, weights)


@dataclass
class OspreyInputs:
    pixel_values: torch.Tensor  # [1, 3, S, S]
    masks: torch.Tensor  # [N, H, W] float, the image's own geometry (never padded)
    input_ids: torch.Tensor  # [1, T]
    region_index: torch.Tensor  # [R] mask index of each region, in prompt order


class Osprey(nn.Module):
    def __init__(
        self,
        config: RGPTConfig,
        tokenizer: Tokenizer | None = None,
        *,
        llm: LlamaForCausalLM | None = None,
    ):
        super().__init__()
        if config.family != "osprey":
            raise ValueError(f"Osprey needs an osprey-family config; got {config.family!r}")
        self.config = config
        me, dims, hidden = config.mask_extractor, config.convnext.dims, config.llm.hidden_size
        self.vision = ConvNeXtTrunk(config.convnext)
        image_channels = dims[me.image_level]
        self.mm_projector = nn.Sequential(
            nn.Linear(image_channels, hidden), nn.GELU(), nn.Linear(hidden, hidden)
        )
        self.mask_extractor = MaskExtractor(dims, me.embed_dim, hidden, me.mask_size)
        self.llm = llm if llm is not None else build_llm(config.llm)
        self.tokenizer = ensure_special_tokens(
            tokenizer or default_tokenizer(tokens=config.tokens), config.tokens
        )
        names = config.tokens
        self.image_token_id = self.tokenizer.token_to_id(names.image)
        self.mask_token_id = self.tokenizer.token_to_id(names.region)
        self.bos_token_id = self.tokenizer.token_to_id(names.bos)
        self.eos_token_id = self.tokenizer.token_to_id(names.eos)
        pad = self.tokenizer.token_to_id(names.pad)
        self.pad_token_id = pad if pad is not None else self.eos_token_id

    # --- the stages ---------------------------------------------------------------------
    def encode_image(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """pixel_values [B, 3, S, S] -> (image embeddings [B, g², D], [res2..res5] NCHW)."""
        levels = self.vision(pixel_values)
        image = levels[self.config.mask_extractor.image_level]  # [B, C, g, g]
        tokens = image.flatten(2).transpose(1, 2)  # [B, g², C]
        projector = self.mm_projector[0].weight.dtype
        return self.mm_projector(tokens.to(projector)), levels

    def encode_regions(
        self, levels: Sequence[torch.Tensor], masks: torch.Tensor, batch_index=None
    ) -> torch.Tensor:
        """levels (B images), masks [N, Hm, Wm], batch_index [N] -> [N, 2, D]."""
        if batch_index is None:
            batch_index = torch.zeros(masks.shape[0], dtype=torch.int64)
        out = []
        for n in range(masks.shape[0]):
            b = int(batch_index[n])
            out.append(self.mask_extractor([lvl[b] for lvl in levels], masks[n : n + 1]))
        return torch.cat(out)

    def build_inputs_embeds(
        self, input_ids: torch.Tensor, image_embeds: torch.Tensor, region_embeds: torch.Tensor
    ) -> torch.Tensor:
        """input_ids [B, T]; image_embeds [B, g², D]; region_embeds [R, 2, D] for the R <mask>
        tokens in row-major order: each <mask> takes its first embedding and the token right
        after it (<pos>) its second, as Osprey's prepare_inputs_labels_for_multimodal does."""
        image_slots = input_ids == self.image_token_id
        mask_slots = input_ids == self.mask_token_id
        pos_slots = torch.zeros_like(mask_slots)
        pos_slots[:, 1:] = mask_slots[:, :-1]
        if int(mask_slots.sum()) != region_embeds.shape[0]:
            raise ValueError(
                f"the prompt holds {int(mask_slots.sum())} <mask> tokens but "
                f"{region_embeds.shape[0]} regions were given"
            )
        spliced = image_slots | mask_slots | pos_slots
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(spliced, 0)).clone()
        embeds[image_slots] = image_embeds.reshape(-1, image_embeds.shape[-1]).to(embeds.dtype)
        embeds[mask_slots] = region_embeds[:, 0].to(embeds.dtype)
        embeds[pos_slots] = region_embeds[:, 1].to(embeds.dtype)
        return embeds

    def forward(self, pixel_values, input_ids, masks, region_index=None) -> torch.Tensor:
        """The logits [B, T, V] of one image's prompt (B = 1)."""
        image_embeds, levels = self.encode_image(pixel_values)
        regions = self.encode_regions(levels, masks)
        if region_index is not None:
            regions = regions[region_index]
        embeds = self.build_inputs_embeds(input_ids, image_embeds, regions)
        return self.llm(inputs_embeds=embeds, use_cache=False).logits

    # --- the reference pipeline ---------------------------------------------------------
    def prepare(self, image: ImageLike, masks: Sequence[MaskLike], question: str) -> OspreyInputs:
        """Osprey's preprocessing: the image resized (bicubic) so that its short side is S,
        normalised, then resized (bilinear) to S x S; masks stay in the image's geometry."""
        pixels = load_image(image)
        loaded = [load_mask(m, pixels.shape[:2], i) for i, m in enumerate(masks)]
        tokens = tokenize_conversation(
            self.tokenizer,
            Conversation.single(question, template=OSPREY_TEMPLATE),
            num_regions=len(loaded),
            num_image_tokens=self.config.num_image_tokens,
            tokens=self.config.tokens,
        )
        vision = self.config.vision
        return OspreyInputs(
            pixel_values=osprey_pixels(
                pixels, vision.image_size, vision.image_mean, vision.image_std
            ),
            masks=torch.from_numpy(np.stack(loaded)).float(),
            input_ids=torch.tensor([tokens.input_ids], dtype=torch.int64),
            region_index=torch.tensor(tokens.region_order, dtype=torch.int64),
        )

    @torch.no_grad()
    def answer_ids(self, inputs: OspreyInputs, max_new_tokens: int = 64) -> list[int]:
        """Greedy answer ids (without the final eos) from transformers' generate."""
        image_embeds, levels = self.encode_image(inputs.pixel_values)
        regions = self.encode_regions(levels, inputs.masks)[inputs.region_index]
        embeds = self.build_inputs_embeds(inputs.input_ids, image_embeds, regions)
        out = self.llm.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones_like(inputs.input_ids),
            generation_config=GenerationConfig(
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=self.eos_token_id,
                pad_token_id=self.pad_token_id,
                bos_token_id=self.bos_token_id,
            ),
        )
        ids = out[0].tolist()
        return ids[: ids.index(self.eos_token_id)] if self.eos_token_id in ids else ids

    def answer(self, image, masks, question: str, max_new_tokens: int = 64) -> str:
        self.eval()
        ids = self.answer_ids(self.prepare(image, masks, question), max_new_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    # --- loading ------------------------------------------------------------------------
    @classmethod
    def from_files(
        cls, osprey_dir: str | Path, convnext: str | Path | None = None, dtype=torch.float32
    ) -> Osprey:
        """The public checkpoint: the Osprey-7b folder and OpenCLIP's ConvNeXt file (None: the
        trunk the folder's own shards hold). Read without running Osprey's code."""
        from rgpt_rt.export.osprey_source import OspreySource

        source = OspreySource.open(osprey_dir, convnext)
        model = cls(source.config, source.tokenizer())
        model.vision.load_state_dict(source.read_trunk(dtype))
        model.mm_projector.load_state_dict(source.read_projector(dtype))
        model.mask_extractor.load_state_dict(source.read_mask_extractor(dtype))
        llm = {name: source.llm.read(name, dtype) for name in source.llm.llama_names()}
        if model.config.llm.tie_word_embeddings:
            llm.pop("lm_head.weight", None)
        model.llm.load_state_dict(llm, strict=not model.config.llm.tie_word_embeddings)
        return model.to(dtype)


def osprey_pixels(pixels: np.ndarray, size: int, mean, std) -> torch.Tensor:
    """[H, W, 3] uint8 -> [1, 3, size, size] float32, as Osprey's demo and training data do:
    CLIPImageProcessor (resample=3: bicubic) to a short side of `size` without the centre crop,
    rescaled by 1/255, normalised, then F.interpolate bilinear to size x size."""
    height, width = pixels.shape[:2]
    short, long = sorted((height, width))
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)  # PIL: (w, h)
    resized = Image.fromarray(pixels).resize(new_size, Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(resized, dtype=np.float32) * (1 / 255))  # [h, w, 3]
    x = (x - torch.tensor(mean)) / torch.tensor(std)
    x = x.permute(2, 0, 1)[None].contiguous()
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
