"""--review in a real browser (headless Chromium through Playwright): find a caption, edit it with the keyboard,
save it with Ctrl+Enter, and see the file, its record and the next run treat it as a person's edit."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import caches, user_message
from tests.review_server import ReviewServer, ds, endpoint_args, run_main_off_the_loop, template  # noqa: F401

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
EVIL = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2"> & <b>bold</b>'


pytestmark = pytest.mark.xdist_group("browser")


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for this module: Debian's, since Playwright's own download host is out of reach.
    Module-scoped because Playwright's sync API keeps an event loop running on this thread until it stops, and
    the tests that run after this module on the same worker start their own with asyncio.run."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed: pip install -r requirements-dev.txt")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    errors: list[str] = []
    page = context.new_page()
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.set_default_timeout(15_000)  # actions and waits; expect's own default is 5 s, short for a busy CI machine
    from playwright.sync_api import expect

    expect.set_options(timeout=15_000)
    yield page
    context.close()
    assert errors == []


def records_of(ds: Path) -> list[dict]:
    folder = ds / ".enhance_captions"
    files = [folder / "records.jsonl", *sorted((folder / "journal").glob("*.jsonl"))]
    return [json.loads(line) for f in files if f.exists() for line in f.read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
def test_edit_save_and_rerun_in_a_browser(tmp_path, ds, llm_server, capsys, page):
    from playwright.sync_api import expect

    combined = [caches(ds / f"img00{i}.jpg")[1] for i in range(3)]
    combined[0].write_text(EVIL + "\n", encoding="utf-8")  # a hand edit holding markup
    with ReviewServer(tmp_path, ds) as review:
        page.goto(review.url)
        card = {i: page.locator(f'section.card[data-id="img00{i}.jpg"]') for i in range(3)}
        shown = card[1].locator('.cap[data-kind="combined"] .text')
        expect(shown).to_have_text(combined[1].read_text(encoding="utf-8").strip())

        # markup in a caption is text: it runs nothing and shows as written
        expect(card[0].locator('.cap[data-kind="combined"] .text')).to_have_text(EVIL)
        assert card[0].locator('.cap[data-kind="combined"] .text').evaluate("e => e.children.length") == 0
        assert page.locator('img[src="x"], script:not([nonce])').count() == 0
        assert page.evaluate("typeof window.pwned") == "undefined"
        # a thumbnail: waited for, not read at once (the image loads after the card is shown)
        # (expect polls in the page without eval, which the page's CSP forbids; wait_for_function would not)
        expect(page.locator(".card img").first).to_have_js_property("complete", True)
        assert page.evaluate("document.querySelector('.card img').naturalWidth") > 0

        # j moves to the next card, e edits its combined caption, Ctrl+Enter saves
        expect(card[0]).to_have_class("card current")
        page.keyboard.press("j")
        expect(card[1]).to_have_class("card current")
        page.keyboard.press("e")
        editor = card[1].locator('.cap[data-kind="combined"] textarea')
        expect(editor).to_be_focused()
        editor.fill("a person's caption, typed in the review page")
        editor.press("Control+Enter")
        expect(page.locator("#status")).to_have_text(
            "saved img001_combined.txt as a hand edit; the next run leaves this image as it is and keeps "
            "img001_combined.txt as edited by hand")
        expect(card[1].locator('.cap[data-kind="combined"] .text')).to_have_text(
            "a person's caption, typed in the review page")
        expect(card[1].locator(".tags")).to_have_text("img001_combined.txt: edited by hand (kept)")
        assert combined[1].read_bytes() == b"a person's caption, typed in the review page\n"
        record = [r for r in records_of(ds) if r.get("cache") == "img001_combined.txt"][-1]
        assert record["by_hand"] is True and record["sha"] == digest(combined[1])

        # Esc cancels: nothing written
        page.keyboard.press("k")
        expect(card[0]).to_have_class("card current")
        page.keyboard.press("e")
        editor = card[0].locator('.cap[data-kind="combined"] textarea')
        editor.fill("typed, then thought better of")
        editor.press("Escape")
        expect(editor).to_have_count(0)
        expect(page.locator("#status")).to_have_text("cancelled: img000_combined.txt is as it was")
        assert combined[0].read_text(encoding="utf-8") == EVIL + "\n"

        # a file changed on disk since the page showed it: refused, and the page shows it as it is now
        page.keyboard.press("e")
        editor.fill("the page's version")
        combined[0].write_text("another editor's version\n", encoding="utf-8")
        editor.press("Control+Enter")
        expect(page.locator("#status")).to_contain_text("not saved: img000_combined.txt changed on disk")
        expect(card[0].locator('.cap[data-kind="combined"] .text')).to_have_text("another editor's version")
        expect(editor).to_have_value("the page's version")
        assert combined[0].read_text(encoding="utf-8") == "another editor's version\n"
        editor.press("Escape")

        # a manual caption edited with a click: the next run merges exactly that image again
        card[2].locator('.cap[data-kind="manual"] .text').click()
        editor = card[2].locator('.cap[data-kind="manual"] textarea')
        editor.fill("subject2, now with a lighthouse")
        editor.press("Control+Enter")
        expect(page.locator("#status")).to_have_text(
            "saved img002.txt; the next run merges img002_combined.txt again (manual changed)")
        assert (ds / "img002.txt").read_text(encoding="utf-8") == "subject2, now with a lighthouse\n"

        # the page filters what the plan says
        page.locator("#filters button", has_text="stale").click()
        expect(page.locator("section.card")).to_have_count(1)
        expect(page.locator("section.card")).to_have_attribute("data-id", "img002.jpg")
        page.locator("#filters button", has_text="all").click()
        page.locator("#q").fill("TYPED IN THE REVIEW")  # a search over the captions, in any case
        expect(page.locator("section.card")).to_have_count(1)
        expect(page.locator("section.card")).to_have_attribute("data-id", "img001.jpg")
        page.locator("#q").fill("no caption says this")
        expect(page.locator("#more")).to_have_text("no images match")
        expect(page.locator("section.card")).to_have_count(0)

    code, out, err = run_main_off_the_loop(capsys, *endpoint_args(ds, llm_server))
    assert code == 0, out + err
    assert len(llm_server.requests) == 1
    assert "subject2, now with a lighthouse" in user_message(llm_server.requests[0])
    assert combined[1].read_bytes() == b"a person's caption, typed in the review page\n"  # kept
    assert combined[0].read_text(encoding="utf-8") == "another editor's version\n"
    assert "edited by hand (kept): 2 (2 combined)" in out


def digest(path: Path) -> str:
    import enhance_captions as ec

    return ec.digest(path.read_bytes())
