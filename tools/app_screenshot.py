"""Drive the editing page in headless Chromium: generate, paint a stroke, type an edit, apply, read the savings.

    .venv/bin/python tools/app_screenshot.py docs/images/app.png     # the README's screenshot: the shapes model, a
                                                                     # shape swap, its region detected

`drive` is what the browser test (`tests/test_app.py`) runs too. Needs Chromium and its driver (Debian:
`apt-get install chromium chromium-driver`), Selenium and the [app] extra.
"""

from __future__ import annotations

import shutil
import socket
import sys
import tempfile
from pathlib import Path


def chromium() -> tuple[str, str] | None:
    """(browser, driver) paths, or None where either is missing."""
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drive(url: str, screenshot: Path, source: str | None = None, edit: str = "a red cabin in the woods",
          paint: bool = True, timeout: float = 300.0) -> str:
    """Open `url`, generate (with `source` as the prompt, if given), paint a stroke over the middle of the current
    picture (unless not `paint`: the mask is then detected), apply `edit`, write a screenshot, and return the page's
    summary of the edit."""
    from selenium import webdriver
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    browser_path, driver_path = chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser_path
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1300"):
        options.add_argument(argument)
    browser = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    try:
        browser.get(url)
        wait = WebDriverWait(browser, timeout)
        if source is not None:
            field = wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, "#source-prompt textarea")))
            field.clear()
            field.send_keys(source)
        wait.until(ready.element_to_be_clickable((By.ID, "generate"))).click()
        wait.until(lambda b: "Generated in" in b.find_element(By.ID, "summary").text)
        if paint:
            canvas = browser.find_element(By.CSS_SELECTOR, "#current canvas")
            ActionChains(browser).move_to_element(canvas).click_and_hold().move_by_offset(30, 0) \
                .move_by_offset(0, 30).move_by_offset(-30, 0).release().perform()
        browser.find_element(By.CSS_SELECTOR, "#edited-prompt textarea").send_keys(edit)
        browser.find_element(By.ID, "apply").click()
        wait.until(lambda b: "of the MACs" in b.find_element(By.ID, "summary").text)
        summary = browser.find_element(By.ID, "summary").text
        browser.save_screenshot(str(screenshot))
        return summary
    finally:
        browser.quit()


def main(argv: list[str]) -> int:
    from fisedit_compiler.app import launch
    from fisedit_compiler.models import load_pipeline
    from fisedit_compiler.service import ComputeThread
    from fisedit_compiler.training.quality import SHAPES_MODEL

    if chromium() is None:
        print("no Chromium: apt-get install chromium chromium-driver", file=sys.stderr)
        return 2
    out = Path(argv[0] if argv else "docs/images/app.png")
    port = free_port()
    with tempfile.TemporaryDirectory() as data:
        compute = ComputeThread()  # as `fisedit app` runs
        page = launch(compute.call(load_pipeline, str(SHAPES_MODEL)), data, port=port, block=False, compute=compute)
        try:
            print(drive(f"http://127.0.0.1:{port}", out, source="a red circle and a blue square on a gray background",
                        edit="a red square and a blue square on a gray background", paint=False))
        finally:
            page.close()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
