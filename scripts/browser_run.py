"""Drive QJL studio in headless Chromium: load the page, optionally fill the prompt, start a run, wait for it to
finish and for the charts, and save a screenshot.

    python scripts/browser_run.py http://127.0.0.1:7860 assets/screenshot.png --passkey 2000 --tokens 32

Uses Debian's Chromium (``apt-get install -y chromium``) through Playwright's Python package; no browser download.
"""

from __future__ import annotations

import argparse
import time

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
CHARTS = ("chart-memory", "chart-device", "chart-latency", "chart-agreement")


def run_in_browser(url: str, screenshot: str, prompt: str | None = None, passkey: int | None = None,
                   tokens: int | None = None, timeout_s: float = 300) -> dict:
    """Runs one comparison in the page; returns the final status text, both outputs and the seconds from the click
    to the first tokens of both sides and to the end."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1700})
            page.goto(url, wait_until="domcontentloaded", timeout=timeout_s * 1000)
            page.locator("#run").wait_for(timeout=timeout_s * 1000)
            if passkey is not None:
                page.get_by_text("Passkey retrieval", exact=True).click()
                length = page.locator("input[aria-label='number input for Length (tokens)']")
                length.fill(str(passkey))
                length.press("Enter")
                page.get_by_role("button", name="Make passkey prompt").click()
                page.wait_for_function("document.querySelector('#prompt textarea').value.length > 1000",
                                       timeout=timeout_s * 1000)
            if prompt is not None:
                page.locator("#prompt textarea").fill(prompt)
            if tokens is not None:
                box = page.locator("#max-new-tokens input[type=number]")
                box.fill(str(tokens))
                box.press("Enter")
            page.locator("#run").click()
            clicked = time.perf_counter()
            page.wait_for_function("document.querySelector('#text-full textarea').value.length > 0 && "
                                   "document.querySelector('#text-compressed textarea').value.length > 0",
                                   timeout=timeout_s * 1000, polling=100)
            first_tokens_s = time.perf_counter() - clicked
            page.wait_for_function("/Done|Could not run|Out of memory/.test(document.querySelector('#status')"
                                   ".innerText)", timeout=timeout_s * 1000, polling=100)
            finished_s = time.perf_counter() - clicked
            for chart in CHARTS:
                page.locator(f"#{chart} .js-plotly-plot").wait_for(timeout=30_000)
            page.wait_for_timeout(500)  # let plotly finish drawing
            page.screenshot(path=screenshot, full_page=True)
            return {"status": page.locator("#status").inner_text(),
                    "text_full": page.locator("#text-full textarea").input_value(),
                    "text_compressed": page.locator("#text-compressed textarea").input_value(),
                    "first_tokens_s": first_tokens_s, "finished_s": finished_s}
        finally:
            browser.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("screenshot")
    parser.add_argument("--prompt", help="text to run (default: what the page holds)")
    parser.add_argument("--passkey", type=int, help="make a passkey prompt of this many tokens")
    parser.add_argument("--tokens", type=int, help="max new tokens")
    args = parser.parse_args()
    result = run_in_browser(args.url, args.screenshot, args.prompt, args.passkey, args.tokens)
    for key, value in result.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
