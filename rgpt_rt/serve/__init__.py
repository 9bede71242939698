"""`rgpt-rt serve`: a Session behind an HTTP API (task endpoints with server-sent-event
streaming, OpenAI-compatible chat completions) and a page at / to point at regions.

    from rgpt_rt.serve import ServeLimits, create_app
    from rgpt_rt.serve.server import run_server
    limits = ServeLimits(queue_depth=4)
    run_server(create_app(rgpt_rt.Session(bundle), limits), limits, "127.0.0.1", 8080)

Needs the `serve` extra (fastapi, uvicorn): pip install 'rgpt_rt[serve]'. Importing this
package does not import them (the command line reads ServeLimits without them).
"""

from rgpt_rt.serve.limits import ServeLimits

__all__ = ["ServeLimits", "create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from rgpt_rt.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'rgpt_rt.serve' has no attribute {name!r}")
