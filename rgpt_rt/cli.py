"""`rgpt-rt`: the command line.

rgpt-rt info        what this install holds (kernels built, CUDA, versions)
rgpt-rt train       train or fine-tune a model (same options as `python -m rgpt_rt.train`)
rgpt-rt eval        per-task held-out accuracy (same options as `python -m rgpt_rt.eval`)
"""

from __future__ import annotations

import argparse
import json
import sys


def cmd_info(_args: argparse.Namespace) -> int:
    import torch

    import rgpt_rt
    from rgpt_rt import _C

    info = {
        "rgpt_rt": rgpt_rt.__version__,
        "torch": torch.__version__,
        "torch_cuda_available": torch.cuda.is_available(),
        "build": _C.build_info(),
    }
    if hasattr(_C, "cuda_runtime_info"):
        info["cuda_runtime"] = _C.cuda_runtime_info()
    print(json.dumps(info, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rgpt-rt", description="Region understanding at the edge (RegionGPT)."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="what this install holds: kernels, CUDA, versions")
    info.set_defaults(run=cmd_info)
    train = commands.add_parser(
        "train", help="train tiny on the shapes world, or fine-tune on COCO-format region data"
    )
    from rgpt_rt import train as train_module

    train_module.add_arguments(train)
    train.set_defaults(run=train_module.run)
    evaluate = commands.add_parser("eval", help="per-task held-out accuracy of a checkpoint")
    from rgpt_rt import eval as eval_module

    eval_module.add_arguments(evaluate)
    evaluate.set_defaults(run=eval_module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
