"""The playground page (GET / of the app) in a real headless Chromium, driven by Selenium,
against the real test server: the key typed in, an ensemble picked, a prompt sent, the answer
streamed in with each segment coloured by its writer, the legend, the tooltips and the turn
timeline; errors of the API shown in the page.

Debian's chromium and chromedriver (`apt-get install chromium chromium-driver`; `.ci/run`
installs them, and fails the test without them): Selenium is pointed at that driver, so its
manager never downloads a browser. Elsewhere the test is skipped when they are missing.
The answered page is saved as playground.png in the test's tmp_path (docs/playground.png is
made by docs/playground_screenshot.py, with the zoo's checkpoints).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.wait import WebDriverWait

from tests.deploy.server import API_KEY, RunningServer

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ANSWER_WAIT_S = 60  # a streamed answer of the tiny models takes a second or two
PROMPT = "Once upon a time"
MAX_TOKENS = 24  # six round-robin segments of 4: both writers of "pair" appear


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        # CI installs them (.ci/run) and says so: there a missing browser fails the test
        message = "needs Debian's chromium and chromium-driver (apt-get install -y ...)"
        if os.environ.get("ANTIPHON_BROWSER_TESTS") == "required":
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def page_url(server: RunningServer) -> str:
    return f"{server.url}/"


def open_page(browser: WebDriver, server: RunningServer) -> None:
    """The page loaded fresh, the key typed in, the ensembles listed."""
    browser.get(page_url(server))
    browser.execute_script("localStorage.clear()")
    browser.get(page_url(server))
    key = browser.find_element(By.ID, "api-key")
    key.clear()
    key.send_keys(API_KEY)
    browser.find_element(By.ID, "prompt").click()  # leaving the box fires its change event
    WebDriverWait(browser, 30).until(
        lambda b: len(Select(b.find_element(By.ID, "ensemble")).options) > 0
    )


def pick(browser: WebDriver, ensemble: str) -> None:
    """The ensemble picked (which resets the policy and its parameters to the ensemble's)."""
    Select(browser.find_element(By.ID, "ensemble")).select_by_value(ensemble)


def ask(browser: WebDriver, prompt: str, max_tokens: int | None = None) -> None:
    box = browser.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(prompt)
    if max_tokens is not None:
        field = browser.find_element(By.ID, "max-tokens")
        field.clear()
        field.send_keys(str(max_tokens))
    browser.find_element(By.ID, "send").click()


def wait_for_answer(browser: WebDriver) -> None:
    """Until the `done` event is shown (or an error is); fails with the page's error."""

    def finished(b: WebDriver) -> bool:
        return bool(b.find_element(By.ID, "summary").text or error_text(b))

    try:
        WebDriverWait(browser, ANSWER_WAIT_S).until(finished)
    except TimeoutException:
        pytest.fail(f"no answer within {ANSWER_WAIT_S} s; status: "
                    f"{browser.find_element(By.ID, 'status').text!r}")  # fmt: skip
    assert not error_text(browser), error_text(browser)


def error_text(browser: WebDriver) -> str:
    box = browser.find_element(By.ID, "error")
    return box.text if box.is_displayed() else ""


def segments(browser: WebDriver) -> list[dict[str, str]]:
    """The answer's segments as the page shows them."""
    return browser.execute_script(
        """return [...document.querySelectorAll('#answer .segment')].map((s) => ({
             model: s.dataset.model, kind: s.dataset.kind, turn: s.dataset.turn,
             text: s.textContent, title: s.title,
             colour: getComputedStyle(s).backgroundColor}));"""
    )


def legend(browser: WebDriver) -> dict[str, str]:
    """Model -> the colour of its swatch in the legend."""
    return browser.execute_script(
        """return Object.fromEntries([...document.querySelectorAll('#legend li')].map((li) =>
             [li.dataset.model,
              getComputedStyle(li.querySelector('.swatch')).backgroundColor]));"""
    )


def timeline(browser: WebDriver) -> list[list[str]]:
    rows = browser.find_elements(By.CSS_SELECTOR, "#timeline tbody tr")
    return [[cell.text for cell in row.find_elements(By.TAG_NAME, "td")] for row in rows]


def the_same_answer(server: RunningServer, ensemble: str, max_tokens: int) -> dict:
    """The non-streamed answer to the page's request (greedy: the same segments)."""
    r = httpx.post(f"{server.url}/v1/generate", headers=server.headers, timeout=120,
                   json={"prompt": PROMPT, "ensemble": ensemble, "max_tokens": max_tokens,
                         "temperature": 0.0})  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()


def test_the_page_is_served_without_the_key_and_the_api_still_needs_it(server):
    page = httpx.get(page_url(server), timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<title>antiphon playground</title>" in page.text
    assert " src=" not in page.text and "<link" not in page.text  # nothing fetched from elsewhere
    assert httpx.get(f"{server.url}/v1/models", timeout=30).status_code == 401
    bare = httpx.get(server.url, timeout=30, follow_redirects=True)  # no slash after the prefix
    assert bare.status_code == 200 and bare.text == page.text, (bare.status_code, bare.url)


def test_the_model_cards_give_the_pickers_policies_and_parameters_a_request_may_send(server):
    cards = {c["id"]: c for c in httpx.get(f"{server.url}/v1/models",
                                           headers=server.headers).json()["data"]}  # fmt: skip
    assert cards["pair"]["antiphon_policy_params"] == {"segment_len": 4}
    # switch's switcher_path and deployment are the config's alone: not on the card
    assert cards["switched"]["antiphon_policy_params"] == {"segment_len": 4}
    assert cards["switched"]["antiphon_policies"][0] == "switch"
    assert "switch" not in cards["pair"]["antiphon_policies"]  # it needs a config's switcher
    assert {"fixed", "round_robin", "random_switch", "defer"} <= set(
        cards["pair"]["antiphon_policies"]
    )
    # what the page sends back for the ensemble's own policy is taken as it is
    for name in ("pair", "switched"):
        card = cards[name]
        body = {
            "prompt": PROMPT,
            "ensemble": name,
            "max_tokens": 4,
            "policy": card["antiphon_policy"],
            "policy_params": card["antiphon_policy_params"],
        }
        r = httpx.post(f"{server.url}/v1/generate", json=body, headers=server.headers, timeout=120)
        assert r.status_code == 200, r.text


def test_an_answer_streams_in_coloured_by_its_writers_with_its_timeline(server, browser, tmp_path):
    open_page(browser, server)
    cards = {c["id"]: c for c in httpx.get(f"{server.url}/v1/models",
                                           headers=server.headers).json()["data"]}  # fmt: skip
    shown = [o.get_attribute("value")
             for o in Select(browser.find_element(By.ID, "ensemble")).options]  # fmt: skip
    assert shown == list(cards)
    pick(browser, "pair")
    # the policy picker starts at the ensemble's own policy with its configured parameters
    assert (
        Select(browser.find_element(By.ID, "policy")).first_selected_option.get_attribute("value")
        == cards["pair"]["antiphon_policy"]
        == "round_robin"
    )
    params = json.loads(browser.find_element(By.ID, "policy-params").get_attribute("value"))
    assert params == cards["pair"]["antiphon_policy_params"] == {"segment_len": 4}
    assert browser.execute_script("return localStorage.getItem('antiphon.playground.apiKey')") \
        == API_KEY  # fmt: skip

    ask(browser, PROMPT, MAX_TOKENS)
    wait_for_answer(browser)

    shown_segments, colours = segments(browser), legend(browser)
    models = cards["pair"]["antiphon_models"]
    assert list(colours) == models == ["a", "b"]
    assert len(set(colours.values())) == len(models)  # one colour per model
    expected = the_same_answer(server, "pair", MAX_TOKENS)["segments"]
    assert [(s["model"], s["text"]) for s in shown_segments] == [
        (s["model"], s["text"]) for s in expected
    ]
    assert {s["model"] for s in shown_segments} == set(models)  # both wrote
    for seg in shown_segments:
        assert seg["colour"] == colours[seg["model"]], seg
        assert seg["title"].startswith(f"{seg['model']}: turn {seg['turn']}, write"), seg
        assert "log-probs: " in seg["title"]
        # b carries a deferral gate (in every ensemble): its gate values, a's none
        assert ("gates: " in seg["title"]) == (seg["model"] in cards["pair"]["antiphon_gates"])
    assert [s["turn"] for s in shown_segments] == [str(s["turn"]) for s in expected]

    rows = timeline(browser)
    assert [(row[0], row[1], row[2], row[3]) for row in rows] == [
        (str(s["turn"]), s["model"], s["kind"], str(s["num_tokens"])) for s in expected
    ]
    assert all(row[4].isdigit() for row in rows)  # the time since the event before it, in ms

    assert browser.save_screenshot(str(tmp_path / "playground.png"))


def test_a_deferral_shows_the_gate_values_and_the_deferred_turns(server, browser):
    """ "deferred": b drafts until its gate fires, then a writes the deferred tokens."""
    open_page(browser, server)
    pick(browser, "deferred")
    ask(browser, PROMPT, MAX_TOKENS)
    wait_for_answer(browser)
    shown = segments(browser)
    expected = the_same_answer(server, "deferred", MAX_TOKENS)["segments"]
    assert [(s["model"], s["kind"], s["turn"]) for s in shown] == [
        (s["model"], s["kind"], str(s["turn"])) for s in expected
    ]
    assert {(s["model"], s["kind"]) for s in shown} == {("b", "write"), ("a", "deferred")}
    for seg, want in zip(shown, expected, strict=True):
        gates = [line for line in seg["title"].split("\n") if line.startswith("gates: ")]
        if seg["model"] == "b":  # a value before each token, one more where the gate fired
            assert [g.removeprefix("gates: ").split(", ") for g in gates] == [
                [f"{g:.2f}" for g in want["gates"]]
            ]
        else:
            assert not gates
    assert "(gate)" in browser.find_element(By.CSS_SELECTOR, '#legend li[data-model="b"]').text
    assert [row[2] for row in timeline(browser)] == [s["kind"] for s in expected]


def test_the_apis_errors_are_shown_in_the_page(server, browser):
    open_page(browser, server)
    pick(browser, "pair")
    params = browser.find_element(By.ID, "policy-params")
    params.clear()
    params.send_keys('{"segment_len": 0}')  # round_robin's segments have at least one token
    ask(browser, PROMPT)
    WebDriverWait(browser, ANSWER_WAIT_S).until(error_text)
    assert error_text(browser).startswith("400: ") and "segment_len" in error_text(browser)
    assert not segments(browser)

    params.clear()
    params.send_keys("{not json")
    browser.find_element(By.ID, "send").click()
    assert "not valid JSON" in error_text(browser)  # refused before anything is sent
