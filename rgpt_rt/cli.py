"""`rgpt-rt`: the command line.

    rgpt-rt describe IMAGE --mask MASK.png [--stream]       describe a region (or --box x0,y0,x1,y1)
    rgpt-rt classify IMAGE --box 10,20,60,80                name its category
    rgpt-rt refer IMAGE "the red star" --mask a.png --mask b.png
    rgpt-rt ask IMAGE "Is <region1> above <region2>?" --box ... --box ...
    rgpt-rt train ...                                       python -m rgpt_rt.training.train ...
    rgpt-rt eval ...                                        python -m rgpt_rt.training.eval ...
    rgpt-rt serve [--host 127.0.0.1] [--port 8080]          HTTP API, OpenAI endpoint, page at /
    rgpt-rt info [--bundle B --memory 8GiB]                 what this install holds; a bundle's memory plan
Regions (--mask / --box) are numbered in the order given: <region1>, <region2>, ...
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields


class RegionAction(argparse.Action):
    """--mask and --box append to one ordered list of regions."""

    def __call__(self, parser, namespace, value, option_string=None):
        regions = list(getattr(namespace, "regions", None) or [])
        if option_string == "--box":
            try:
                box = tuple(float(v) for v in value.split(","))
            except ValueError:
                parser.error(f"--box {value!r}: give four numbers x0,y0,x1,y1")
            if len(box) != 4:
                parser.error(f"--box {value!r}: give four numbers x0,y0,x1,y1")
            regions.append(box)
        else:
            regions.append(value)
        namespace.regions = regions


def add_regions(parser: argparse.ArgumentParser, many: bool) -> None:
    what = (
        "a region"
        if not many
        else "a region (repeat for more; order gives <region1>, <region2>, ...)"
    )
    parser.add_argument(
        "--mask",
        action=RegionAction,
        dest="regions",
        metavar="MASK.png",
        help=f"{what} as a mask image",
    )
    parser.add_argument(
        "--box",
        action=RegionAction,
        dest="regions",
        metavar="x0,y0,x1,y1",
        help=f"{what} as a box in pixels",
    )


def add_session_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", help="a bundle folder (default: the embedded default model)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    parser.add_argument("--stats", action="store_true", help="print per-stage timings afterwards")


def open_session(args: argparse.Namespace):
    from rgpt_rt.runtime.session import Session

    return Session(args.bundle, device=args.device)


def regions_of(args: argparse.Namespace, one: bool) -> list:
    regions = getattr(args, "regions", None) or []
    if not regions:
        raise ValueError("give a region with --mask MASK.png or --box x0,y0,x1,y1")
    if one and len(regions) != 1:
        raise ValueError(f"this command takes one region; got {len(regions)}")
    return regions


def print_answer(answer) -> None:
    if isinstance(answer, str):
        print(answer)
        return
    for delta in answer:
        print(delta, end="", flush=True)
    print()


def finish(session, args: argparse.Namespace) -> int:
    if args.stats:
        print(json.dumps(session.stats, indent=2), file=sys.stderr)
    return 0


def cmd_describe(args):
    session = open_session(args)
    answer = session.describe(
        args.image, regions_of(args, True)[0], detailed=not args.brief, stream=args.stream
    )
    print_answer(answer)
    return finish(session, args)


def cmd_classify(args):
    session = open_session(args)
    print(session.classify(args.image, regions_of(args, True)[0], vocabulary=args.vocabulary))
    return finish(session, args)


def cmd_refer(args):
    session = open_session(args)
    choice = session.refer(args.image, args.expression, regions_of(args, False))
    print("No corresponding options found." if choice is None else f"region {choice + 1}")
    return finish(session, args)


def cmd_ask(args):
    session = open_session(args)
    print_answer(
        session.ask(args.image, args.question, regions_of(args, False), stream=args.stream)
    )
    return finish(session, args)


def serve_limits(args: argparse.Namespace):
    """The ServeLimits of `rgpt-rt serve`'s options. --allow-host adds to the local names, and
    the address the server listens on is always allowed."""
    from rgpt_rt.serve.limits import LOCAL_HOSTS, ServeLimits

    values = {item.name: getattr(args, item.name) for item in fields(ServeLimits)}
    values["allowed_hosts"] = (*LOCAL_HOSTS, *(args.allowed_hosts or ()), args.host)
    return ServeLimits(**values)


def cmd_serve(args) -> int:
    try:
        from rgpt_rt.serve import create_app
        from rgpt_rt.serve.server import run_server
    except ImportError as error:
        raise ValueError(
            f"rgpt-rt serve needs the serve extra ({error.name} is missing): "
            "pip install 'rgpt_rt[serve]'"
        ) from None
    limits = serve_limits(args)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    session = open_session(args)
    app = create_app(session, limits)
    info = session.info()
    print(
        f"rgpt-rt serve: {info['model']} on {info['device']} ({info['vision_backend']}), "
        f"http://{args.host}:{args.port}/  (API /v1/..., schema /openapi.json)",
        flush=True,
    )
    run_server(app, limits, args.host, args.port, args.log_level)
    return 0


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    from rgpt_rt.serve.limits import ServeLimits

    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on")
    parser.add_argument("--bundle", help="a bundle folder (default: the embedded default model)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads for the model (default: torch's, one per core); on a machine shared "
        "with other work, 1 is often faster for small models",
    )
    parser.add_argument(
        "--log-level", default="info", choices=("critical", "error", "warning", "info", "debug")
    )
    limits = parser.add_argument_group("limits")
    for item in fields(ServeLimits):
        if isinstance(item.default, tuple):  # --allow-host, repeated
            limits.add_argument(
                item.metadata["flag"],
                dest=item.name,
                action="append",
                metavar="HOST",
                help=item.metadata["help"],
            )
            continue
        limits.add_argument(
            item.metadata["flag"],
            dest=item.name,
            type=type(item.default),
            default=item.default,
            metavar="S" if isinstance(item.default, float) else "N",
            help=f"{item.metadata['help']} (default: {item.default:,})",
        )


def cmd_info(args) -> int:
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
    if args.bundle is None:
        print(json.dumps(info, indent=2))
        return 0
    from rgpt_rt.bundle import verify_bundle
    from rgpt_rt.runtime.memory import MemoryPlan, parse_bytes

    manifest = verify_bundle(args.bundle, hashes=False)
    budget = parse_bytes(args.memory) if args.memory is not None else None
    print(f"bundle {args.bundle}: {manifest.config.name}, sha256 {manifest.sha256}")
    for device in args.plan_device or ("cpu", "cuda"):
        plan = MemoryPlan.of_bundle(manifest, device, max_context=args.max_context)
        print()
        print(plan.table(budget))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rgpt-rt", description="Region understanding at the edge (RegionGPT)."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    describe = commands.add_parser("describe", help="describe a region of an image")
    describe.add_argument("image")
    add_regions(describe, many=False)
    describe.add_argument(
        "--brief", action="store_true", help="a short description instead of a detailed one"
    )
    describe.add_argument(
        "--stream", action="store_true", help="print the answer as it is generated"
    )
    add_session_options(describe)
    describe.set_defaults(run=cmd_describe)

    classify = commands.add_parser("classify", help="name the category of a region")
    classify.add_argument("image")
    add_regions(classify, many=False)
    classify.add_argument(
        "--vocabulary", help="the category names to answer in (default: the model's own)"
    )
    add_session_options(classify)
    classify.set_defaults(run=cmd_classify)

    refer = commands.add_parser("refer", help="which region fits an expression")
    refer.add_argument("image")
    refer.add_argument("expression")
    add_regions(refer, many=True)
    add_session_options(refer)
    refer.set_defaults(run=cmd_refer)

    ask = commands.add_parser(
        "ask", help="a free question about regions: <region1>, <region2>, ..."
    )
    ask.add_argument("image")
    ask.add_argument("question")
    add_regions(ask, many=True)
    ask.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    add_session_options(ask)
    ask.set_defaults(run=cmd_ask)

    serve = commands.add_parser(
        "serve", help="an HTTP API (and OpenAI-compatible endpoint) with a page to point at regions"
    )
    add_serve_options(serve)
    serve.set_defaults(run=cmd_serve)

    info = commands.add_parser(
        "info", help="what this install holds; with --bundle, the memory a Session of it needs"
    )
    info.add_argument("--bundle", help="print the memory plan of this bundle (nothing is loaded)")
    info.add_argument("--memory", help="a budget to check the plan against, e.g. 8GiB")
    info.add_argument("--max-context", type=int, help="positions per call (default: the model's)")
    info.add_argument(
        "--device", dest="plan_device", action="append", choices=("cpu", "cuda"),
        help="plan for this device (default: both)",
    )  # fmt: skip
    info.set_defaults(run=cmd_info)
    # train and eval take their own options (and import the trainer, transformers included,
    # only when they run); no prefix character of their own, so that every argument, options
    # included, reaches the delegate's parser (with "-" argparse kept "--out x" for itself)
    train = commands.add_parser(
        "train",
        add_help=False,
        prefix_chars="\0",
        help="train tiny on the shapes world, or fine-tune on COCO-format region data (--help for options)",
    )
    train.add_argument("args", nargs=argparse.REMAINDER)
    train.set_defaults(run=lambda a: _delegate("rgpt_rt.training.train", a.args))
    evaluate = commands.add_parser(
        "eval",
        add_help=False,
        prefix_chars="\0",
        help="per-task held-out accuracy of a checkpoint (--help for options)",
    )
    evaluate.add_argument("args", nargs=argparse.REMAINDER)
    evaluate.set_defaults(run=lambda a: _delegate("rgpt_rt.training.eval", a.args))
    return parser


def _delegate(module: str, argv: list[str]) -> int:
    import importlib

    return importlib.import_module(module).main(argv)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
