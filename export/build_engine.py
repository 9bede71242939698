#!/usr/bin/env python
"""Checkpoint -> verified bundle: vision.onnx (+ a TensorRT engine where TensorRT is installed)
and the INT4 LLM, with a manifest of hashes and parity errors.

    python export/build_engine.py                                   # the embedded default model -> build/bundles/tiny/
    python export/build_engine.py --checkpoint ckpt/ --out bundles/mine
    python export/build_engine.py --clip clip-vit-large-patch14-336/ --llm vicuna-7b-v1.5/ --rgpt-weights rgpt.safetensors
    python export/build_engine.py --osprey Osprey-7b/ --convnext open_clip_pytorch_model.bin --out bundles/osprey
    python export/build_engine.py --check build/bundles/tiny        # re-verify from the bundle alone: exit 1 on any problem
    python export/build_engine.py --add-engine bundles/mine         # on the GPU that will run it: add its TensorRT engine
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_argument_group("source (default: the embedded default model)")
    source.add_argument("--checkpoint", type=Path, help="an RGPT.save_pretrained folder")
    source.add_argument("--clip", type=Path, help="a local CLIP folder (with --llm)")
    source.add_argument("--llm", type=Path, help="a local LLaMA/Vicuna folder (with --clip)")
    source.add_argument(
        "--rgpt-weights", type=Path, help="refinement + connector weights (rgpt.safetensors)"
    )
    source.add_argument(
        "--osprey", type=Path, help="an Osprey-7b folder (docs/osprey.md), with --convnext"
    )
    source.add_argument(
        "--convnext",
        type=Path,
        help="OpenCLIP's ConvNeXt file for --osprey (open_clip_pytorch_model.bin or .safetensors)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("build/bundles/tiny"),
        help="bundle folder (default %(default)s)",
    )
    parser.add_argument(
        "--quant",
        default="rtn",
        choices=["rtn", "awq", "none"],
        help="LLM weights (default %(default)s)",
    )
    parser.add_argument(
        "--group-size",
        type=int,
        help="INT4 group size along the input dim (default: 128 when it divides every linear, else 64/32/16)",
    )
    parser.add_argument(
        "--calib", type=Path, help="calibration prompts for AWQ (a text file, one prompt per line)"
    )
    parser.add_argument(
        "--trt",
        default="auto",
        choices=["auto", "on", "off"],
        help="TensorRT engine (default %(default)s)",
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=8,
        help="largest image batch of the vision graph (default %(default)s)",
    )
    parser.add_argument(
        "--workspace",
        type=float,
        default=4.0,
        help="TensorRT workspace in GiB (default %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=1234, help="seed of the parity images (default %(default)s)"
    )
    parser.add_argument(
        "--check", type=Path, metavar="BUNDLE", help="re-verify an existing bundle and exit"
    )
    parser.add_argument(
        "--add-engine",
        type=Path,
        metavar="BUNDLE",
        help="build this GPU's TensorRT engine for an existing bundle and list it (--max-batch, --workspace)",
    )
    parser.add_argument(
        "--sha256",
        help="with --check: the manifest digest the bundle must have (its build printed it)",
    )
    parser.add_argument("--json", type=Path, help="also write the summary as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from rgpt_rt.export.build import BuildOptions, build_bundle, summary_table
    from rgpt_rt.export.check import check_bundle

    if args.check is not None:
        try:
            report = check_bundle(args.check, seed=None, sha256=args.sha256)
        except Exception as error:  # a check reports; it never tracebacks
            print(f"bundle check FAILED: {error}", file=sys.stderr)
            return 1
        print(f"bundle check passed: {args.check}")
        print(json.dumps(report, indent=2))
        return 0
    if args.add_engine is not None:
        from rgpt_rt.export.add_engine import add_engine

        try:
            add_engine(args.add_engine, max_batch=args.max_batch, workspace_gb=args.workspace)
        except (ValueError, FileNotFoundError, RuntimeError) as error:
            print(f"error: {error}; {args.add_engine} is unchanged", file=sys.stderr)
            return 2
        return 0
    try:
        options = BuildOptions(
            out=args.out,
            checkpoint=args.checkpoint,
            clip=args.clip,
            llm=args.llm,
            rgpt_weights=args.rgpt_weights,
            osprey=args.osprey,
            convnext=args.convnext,
            quant=args.quant,
            group_size=args.group_size,
            calib=args.calib,
            trt=args.trt,
            max_batch=args.max_batch,
            workspace_gb=args.workspace,
            seed=args.seed,
        )
        manifest = build_bundle(options)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # e.g. a full disk: the partial bundle was removed
        print(f"error: {error}; nothing was written at {args.out}", file=sys.stderr)
        return 2
    print()
    print(f"bundle written: {args.out}")
    print(summary_table(manifest))
    if args.json is not None:
        args.json.write_text(json.dumps(manifest, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
