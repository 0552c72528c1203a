"""Screenshots of the page for docs/: a real question to a running server, at desktop and phone widths.

    python llmws.py &                  # the default model
    python docs/screenshots.py         # writes docs/images/page-1280.png, page-390.png, page-390-dark.png

Uses Debian's chromium (or --chromium PATH) through Playwright; it never downloads a browser.
"""
import argparse
import shutil
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic"]
QUESTION = "Write a short Python function that reverses a string, with an example."
SHOTS = [("page-1280.png", {"width": 1280, "height": 800}, "light"),
         ("page-390.png", {"width": 390, "height": 844}, "light"),
         ("page-390-dark.png", {"width": 390, "height": 844}, "dark")]


def shoot(browser, url, name, viewport, scheme, out):
    context = browser.new_context(viewport=viewport, color_scheme=scheme, device_scale_factor=1)
    page = context.new_page()
    page.goto(url)
    expect(page.locator("#status")).to_have_text("connected")
    narrow = not page.is_visible("#configPanel")  # a phone: the settings are in the ☰ sheet
    if narrow:
        page.click("#togglePanel")
    page.fill("#max_new_tokens", "160")
    if narrow:
        page.click("#togglePanel")
    page.fill("#prompt", QUESTION)
    page.press("#prompt", "Enter")
    expect(page.locator(".turn.assistant .stats")).to_contain_text("tokens/s", timeout=120000)
    page.screenshot(path=str(out / name))
    context.close()
    print(f"wrote {out / name}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8765/")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "images")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium, args=FLAGS)
        for name, viewport, scheme in SHOTS:
            shoot(browser, args.url, name, viewport, scheme, args.out)
        browser.close()


if __name__ == "__main__":
    main()
