"""Make docs/playground.png: the playground page after an answer, in a real headless Chromium.

    python docs/playground_screenshot.py                  # -> docs/playground.png
    python docs/playground_screenshot.py --out /tmp/p.png --ensemble default --prompt "Hi"

Like `antiphon demo`, it starts a private local Ray with the default config (the zoo's
checkpoints) on a free port, opens the page, asks the `switched` ensemble the demo question
(the one every model alone gets wrong; `--prompt` asks another), waits for the whole answer
and saves the screenshot; then shuts the cluster down. Needs Debian's chromium and
chromium-driver (`apt-get install -y chromium chromium-driver`) and selenium (the `test`
extra), which is pointed at that driver, so nothing downloads a browser.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.wait import WebDriverWait

from antiphon.cli import DEMO_PROMPT, SWITCHED_ENSEMBLE, demo_question, local_server

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WINDOW = "1360,1000"  # wide enough for the form beside the answer
ANSWER_WAIT_S = 300  # a cold server on two cores loads its checkpoints on the first request


def screenshot(url: str, ensemble: str, prompt: str, max_tokens: int, out: Path) -> None:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={WINDOW}", "--hide-scrollbars"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.get(f"{url}/")
        wait = WebDriverWait(driver, ANSWER_WAIT_S)
        wait.until(lambda d: len(Select(d.find_element(By.ID, "ensemble")).options) > 0)
        Select(driver.find_element(By.ID, "ensemble")).select_by_value(ensemble)
        driver.find_element(By.ID, "prompt").send_keys(prompt)
        driver.find_element(By.ID, "max-tokens").send_keys(str(max_tokens))
        driver.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_element(By.ID, "summary").text
                   or d.find_element(By.ID, "error").text)  # fmt: skip
        error = driver.find_element(By.ID, "error").text
        if error:
            raise SystemExit(f"the page shows an error: {error}")
        out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("playground.png"))
    parser.add_argument("--ensemble", default=SWITCHED_ENSEMBLE)
    parser.add_argument("--prompt", default=None, help="default: the demo question")
    parser.add_argument("--max-tokens", type=int, default=None)
    args = parser.parse_args()
    question = demo_question() if args.prompt is None else None
    prompt = args.prompt or (question["prompt"] if question else DEMO_PROMPT)
    max_tokens = args.max_tokens or (question["max_tokens"] if question else 48)
    with local_server(None) as (url, _):
        screenshot(url, args.ensemble, prompt, max_tokens, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
