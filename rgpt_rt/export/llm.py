"""The LLM part of a bundle: llm.safetensors with HF tensor names.

    info = write_llm(model, path, quant="rtn" | "awq" | "none", group_size=128)

"none": every tensor as the checkpoint holds it (unquantized). "rtn" / "awq": the seven linears of each decoder layer as INT4
(the project's layout, rgpt_rt/ops/int4_format.py), embeddings, norms and lm_head in fp16. AWQ
calibrates on the model's own inputs: images through the vision stages, a region, and the
task prompts (or the questions of --calib), so the activations are the ones it will see.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rgpt_rt.prompts import classify_prompt, describe_prompt, refer_prompt
from rgpt_rt.ops.int4_format import save_int4
from rgpt_rt.quant.awq_llama import quantize_llama_layer_awq
from rgpt_rt.quant.rtn import quantize_rtn

QUANT_METHODS = ("rtn", "awq", "none")
# The linears that become INT4: attention and MLP projections of every decoder layer.
INT4_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CALIBRATION_SAMPLES = 16


def llm_tensors(llm, dtype: torch.dtype | None = torch.float16) -> dict[str, torch.Tensor]:
    """The LLM's weights with HF names, contiguous, in `dtype` (None: as they are); a tied
    lm_head is stored once."""
    tensors = {}
    for name, value in llm.state_dict().items():
        if name == "lm_head.weight" and getattr(llm.config, "tie_word_embeddings", False):
            continue
        tensors[name] = value.detach().to(dtype or value.dtype).contiguous().cpu()
    return tensors


def is_int4_linear(name: str) -> bool:
    parts = name.split(".")
    return name.endswith(".weight") and len(parts) >= 2 and parts[-2] in INT4_LINEARS


def resolve_group_size(llm_config, requested: int | None) -> int:
    """The group size: `requested`, or (None) 128 when it divides every quantized input width,
    else 64 or 32 (the kernels take multiples of 32). A size that does not divide is an error."""
    widths = sorted(
        {
            llm_config.hidden_size,
            llm_config.intermediate_size,
            llm_config.num_heads * llm_config.head_dim,
        }
    )
    if requested is not None:
        bad = [w for w in widths if w % requested]
        if requested % 32 or bad:
            raise ValueError(
                f"--group-size {requested} must be a multiple of 32 that divides the LLM's input widths {widths}"
            )
        return requested
    for size in (128, 64, 32):
        if all(w % size == 0 for w in widths):
            return size
    raise ValueError(
        f"no group size of 128, 64 or 32 divides the LLM's input widths {widths}; use --quant none"
    )


def write_llm(
    model, path: Path, *, quant: str, group_size: int, calibration: Path | None = None
) -> dict[str, object]:
    """Write llm.safetensors for `model` (an RGPT); group_size from resolve_group_size.
    Returns what the manifest records."""
    if quant not in QUANT_METHODS:
        raise ValueError(f"quant {quant!r} is unknown; use one of {QUANT_METHODS}")
    llm = model.llm
    if quant == "none":  # unquantized: the weights exactly as the checkpoint holds them
        tensors = llm_tensors(llm, dtype=None)
        save_int4(path, {}, tensors)
        return {
            "method": "none",
            "dtype": str(next(iter(tensors.values())).dtype).replace("torch.", ""),
        }
    tensors = llm_tensors(llm)
    group = group_size
    if quant == "rtn":
        weights = {}
        for name in [n for n in tensors if is_int4_linear(n)]:
            fp = llm.state_dict()[name].detach().float()
            weights[name[: -len(".weight")]] = quantize_rtn(fp, group)
            del tensors[name]
    else:
        weights, folded = awq_weights(model, calibration_embeds(model, calibration), group)
        for name in list(tensors):
            if is_int4_linear(name):
                del tensors[name]
        tensors.update({k: v.to(torch.float16).contiguous() for k, v in folded.items()})
    save_int4(path, weights, tensors)
    info: dict[str, object] = {
        "method": quant,
        "bits": 4,
        "group_size": group,
        "layout": "nk8i",
        "fp16": ["embed_tokens", "norms", "lm_head"],
    }
    if quant == "awq":
        info["calibration"] = (
            str(calibration)
            if calibration
            else f"{CALIBRATION_SAMPLES} task prompts on synthetic images"
        )
    return info


# --- AWQ ------------------------------------------------------------------------------------------


def calibration_embeds(
    model, calib: Path | None, count: int = CALIBRATION_SAMPLES
) -> list[torch.Tensor]:
    """Inputs the LLM sees at run time, [1, T, D] each: smooth random images through the vision
    stages, a box region, and a task prompt (the lines of `calib` when given)."""
    if calib is not None:
        questions = [line.strip() for line in calib.read_text().splitlines() if line.strip()]
        if not questions:
            raise ValueError(f"--calib {calib} holds no prompts (one per line)")
        questions = [q if "<region" in q else f"{q} <region1>" for q in questions]
    else:
        questions = [
            describe_prompt(True),
            describe_prompt(False),
            classify_prompt("the shape"),
            refer_prompt("the object", 1),
        ]
    rng = np.random.default_rng(0)
    samples = []
    size = model.config.vision.image_size
    for index in range(count):
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        image = np.kron(coarse, np.ones((size // 4, size // 4, 1), dtype=np.uint8))
        x0, y0 = rng.integers(0, size // 2, 2)
        box = (int(x0), int(y0), int(x0) + size // 3, int(y0) + size // 3)
        prepared = model.prepare(image, [box], questions[index % len(questions)])
        with torch.no_grad():
            image_embeds, hires = model.encode_image(prepared.pixel_values)
            regions = model.encode_regions(hires, prepared.masks)[prepared.region_index]
            samples.append(model.build_inputs_embeds(prepared.input_ids, image_embeds, regions))
    return samples


def awq_weights(model, samples: list[torch.Tensor], group_size: int) -> tuple[dict, dict]:
    """AWQ of every decoder layer on the captured inputs of its four linear groups.
    Returns ({linear name: Int4Weight}, {norm name: folded weight})."""
    llm = model.llm
    layers = llm.model.layers
    captured: dict[tuple[int, str], list[torch.Tensor]] = {}
    hooks = []
    for index, layer in enumerate(layers):
        for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
            module = layer.get_submodule(name)

            def keep(_module, args, key=(index, name)):
                captured.setdefault(key, []).append(
                    args[0].detach().reshape(-1, args[0].shape[-1]).float()
                )

            hooks.append(module.register_forward_pre_hook(keep))
    try:
        with torch.no_grad():
            for embeds in samples:
                llm(inputs_embeds=embeds, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    weights, folded = {}, {}
    for index, layer in enumerate(layers):
        inputs = {name: torch.cat(captured[(index, name)]) for (i, name) in captured if i == index}
        state = {k: v.detach().float() for k, v in layer.state_dict().items()}
        result = quantize_llama_layer_awq(state, inputs, group_size)
        prefix = f"model.layers.{index}."
        weights.update({prefix + name: q for name, q in result.int4.items()})
        folded.update({prefix + name: t for name, t in result.tensors.items()})
    return weights, folded
