"""`rgpt-rt`: the command line.

rgpt-rt info        what this install holds (kernels built, CUDA, versions)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
