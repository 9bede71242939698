"""What one server accepts: sizes, counts, time and the queue, each a flag of `rgpt-rt serve`.

    limits = ServeLimits(max_regions=8, queue_depth=4)
    app = create_app(session, limits)

Over a size limit: 413. Over a count limit: 422. Queue full, or waited in it past the time
limit: 503. Answer past the time limit: 504 (or, once a stream has started, an error event
that ends it).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields


def _limit(default, flag: str, help: str):
    return field(default=default, metadata={"flag": flag, "help": help})


@dataclass(frozen=True)
class ServeLimits:
    max_body_bytes: int = _limit(
        64 << 20, "--max-body-bytes", "the whole request body (base64 adds a third to files)"
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

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name == "queue_depth":
                if not isinstance(value, int) or value < 0:
                    raise ValueError(f"ServeLimits.queue_depth must be 0 or more; got {value}")
            elif not value > 0:
                raise ValueError(f"ServeLimits.{item.name} must be positive; got {value}")

    def as_dict(self) -> dict[str, int | float]:
        return {item.name: getattr(self, item.name) for item in fields(self)}
