"""What one server accepts: sizes, counts, time, the queue and the Host names it answers to,
each a flag of `rgpt-rt serve`.

    limits = ServeLimits(max_regions=8, queue_depth=4)
    app = create_app(session, limits)

Over a size limit: 413. Over a count limit: 422. A Host header not allowed: 400. A body that
does not arrive in time: 408 (a request head that does not: the connection is closed, 408).
Queue full, or waited in it past the time limit: 503. Answer past the time limit: 504 (or,
once a stream has started, an error event that ends it).

Sizes are checked as the body arrives, before it is parsed: its bytes, and an upper bound on
its JSON values (each comma, '[' and '{' counts one), so that no request can make the server
parse millions of values only to refuse them afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")


def _limit(default, flag: str, help: str):
    return field(default=default, metadata={"flag": flag, "help": help})


def host_name(host: str) -> str:
    """A Host header's name, as the allow-list holds it: 'LocalHost:8080' -> 'localhost',
    '[::1]:8080' and '::1' -> '[::1]', 'example.com.' -> 'example.com'."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    if host.count(":") > 1:  # a bare IPv6 address, as --host and --allow-host may give it
        return f"[{host}]"
    return host.partition(":")[0].rstrip(".")


@dataclass(frozen=True)
class ServeLimits:
    max_body_bytes: int = _limit(
        64 << 20, "--max-body-bytes", "the whole request body (base64 adds a third to files)"
    )
    max_json_values: int = _limit(
        200_000,
        "--max-json-values",
        "values in one JSON body, counted as it arrives (a box is 5, an RLE as a list of runs "
        "one per run: send big masks as PNG or compressed RLE)",
    )
    max_image_bytes: int = _limit(
        16 << 20, "--max-image-bytes", "an image file, and each mask PNG, after base64 decoding"
    )
    max_image_pixels: int = _limit(
        4096 * 4096, "--max-image-pixels", "width x height of the image and of each mask"
    )
    max_text_chars: int = _limit(
        4000, "--max-text-chars", "a question, expression or vocabulary; all text of a chat"
    )
    max_regions: int = _limit(16, "--max-regions", "regions in one request")
    max_new_tokens: int = _limit(256, "--max-new-tokens", "the most tokens one answer may ask for")
    request_timeout_s: float = _limit(
        60.0, "--request-timeout", "seconds from arrival: waiting in the queue plus answering"
    )
    queue_depth: int = _limit(
        8, "--queue-depth", "requests that may wait while one runs; more are answered 503"
    )
    header_timeout_s: float = _limit(
        10.0, "--header-timeout", "seconds a client has to send a request's line and headers"
    )
    body_timeout_s: float = _limit(
        30.0,
        "--body-timeout",
        "seconds a client has to send a request's body, once its headers are in",
    )
    idle_timeout_s: float = _limit(
        5.0, "--idle-timeout", "seconds an open connection may wait for its next request"
    )
    allowed_hosts: tuple[str, ...] = _limit(
        LOCAL_HOSTS,
        "--allow-host",
        "a Host name to answer besides localhost, 127.0.0.1, [::1] and --host (repeat for more; "
        "'*' answers any: only behind a proxy that checks it). Other names are refused, so a "
        "web page cannot reach this server through DNS rebinding",
    )

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name == "allowed_hosts":
                if isinstance(value, str) or not all(isinstance(h, str) and h for h in value):
                    raise ValueError(
                        f"ServeLimits.allowed_hosts must be a tuple of host names; got {value!r}"
                    )
                object.__setattr__(self, item.name, tuple(dict.fromkeys(map(host_name, value))))
            elif item.name == "queue_depth":
                if not isinstance(value, int) or value < 0:
                    raise ValueError(f"ServeLimits.queue_depth must be 0 or more; got {value}")
            elif not value > 0:
                raise ValueError(f"ServeLimits.{item.name} must be positive; got {value}")

    def allows_host(self, host: str) -> bool:
        return "*" in self.allowed_hosts or host_name(host) in self.allowed_hosts

    def as_dict(self) -> dict[str, int | float | list[str]]:
        return {
            item.name: list(value)
            if isinstance(value := getattr(self, item.name), tuple)
            else value
            for item in fields(self)
        }
