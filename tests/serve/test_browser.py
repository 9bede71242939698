"""The page at / in headless Chromium (Debian's, at /usr/bin/chromium, which `make test`
installs): load it, take the example image, draw a box, ask for a description and watch it
stream in; then paint a brush region and ask about it."""

import json
from pathlib import Path

import httpx
import pytest
from payloads import EXAMPLE_PNG, SQUARE

pytestmark = pytest.mark.slow  # a browser against a live server: ~5 s on 2 cores

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKENS = 12


@pytest.fixture
def page(live_server, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(
            f"Debian's chromium is not at {CHROMIUM} (make test installs it with apt-get; "
            "here it could not be installed)"
        )
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh --user-data-dir
            executable_path=str(CHROMIUM),
            headless=True,
            args=FLAGS,
            viewport={"width": 1280, "height": 900},
        )
        page = context.new_page()
        page.set_default_timeout(60_000)
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(f"{live_server}/")
        yield page
        context.close()
        assert not errors, f"the page raised: {errors}"


def drag(page, start, end):
    """Drag on the canvas between two points given in the image's pixels."""
    box = page.locator("#canvas").bounding_box()
    size = page.locator("#canvas").get_attribute("data-image-size")
    width, height = (int(v) for v in size.split("x"))

    def at(point):
        x = box["x"] + point[0] / width * box["width"]
        y = box["y"] + point[1] / height * box["height"]
        return x, y

    page.mouse.move(*at(start))
    page.mouse.down()
    page.mouse.move(*at(end), steps=8)
    page.mouse.up()


def run_and_watch(page) -> str:
    """Click Run; return the answer once done, after checking it streamed in."""
    page.evaluate(
        """() => {
          window.textChanges = 0;
          new MutationObserver(() => window.textChanges++).observe(
            document.getElementById("answer"), {childList: true, characterData: true, subtree: true});
        }"""
    )
    page.click("#run")
    page.wait_for_function(
        "['done', 'error'].includes(document.getElementById('answer').dataset.state)"
    )
    answer = page.locator("#answer")
    assert answer.get_attribute("data-state") == "done", answer.text_content()
    return answer.text_content()


def test_the_page_streams_a_description_of_a_drawn_box(page, live_server):
    page.wait_for_function("document.getElementById('model-info').textContent.includes('tiny')")
    page.click("#example")
    page.wait_for_function("document.getElementById('canvas').dataset.imageSize === '320x240'")
    drag(page, SQUARE[:2], SQUARE[2:])
    regions = page.locator("#regions li")
    assert regions.count() == 1
    drawn = json.loads(regions.first.get_attribute("data-box"))
    assert all(abs(a - b) <= 2 for a, b in zip(drawn, SQUARE)), drawn
    page.fill("#max-tokens", str(TOKENS))

    answer = run_and_watch(page)
    deltas = int(page.locator("#answer").get_attribute("data-deltas"))
    assert deltas > 1 and page.evaluate("window.textChanges") > 1, "the answer streamed in"
    expected = httpx.post(
        f"{live_server}/v1/describe",
        json={"image": EXAMPLE_PNG, "box": drawn, "max_new_tokens": TOKENS},
        timeout=60,
    ).json()["answer"]
    assert answer == expected
    stats = page.locator("#stats")
    assert stats.is_visible()
    for label in ("vision", "prefill", "time to first token", "first words, in this browser"):
        assert stats.locator(f"tr[data-key='{label}']").count() == 1, label

    # a brush region beside the box, then a question naming both
    page.check("input[value='brush']")
    drag(page, (60, 60), (100, 100))
    kinds = page.locator("#regions li").evaluate_all("items => items.map(i => i.dataset.kind)")
    assert kinds == ["box", "brush"]
    page.select_option("#task", "ask")
    page.fill("#text", "Is <region1> left of <region2>?")
    page.fill("#max-tokens", "6")
    run_and_watch(page)
    assert page.locator("tr[data-key='regions'] td").last.text_content() == "2"
