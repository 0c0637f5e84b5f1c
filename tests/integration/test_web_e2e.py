"""The web UI end to end in headless Chromium: a row committed in the source database is
answered and cited on the Ask page, and its update is cited within seconds of the commit; the
Status page tells a first-time user which demo token to paste; a search link runs its search.

Drives the Debian `chromium` + `chromium-driver` (installed by `.ci/run`) through selenium,
never letting selenium manager download anything. Screenshots go to `test-artifacts/`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from flask import Flask
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait
from werkzeug.serving import BaseWSGIServer, make_server

from freshet.cdc.demo import ModuleDoc, module_doc_rows
from freshet.settings import Settings
from freshet.web import close_app, create_app
from tests.conftest import wait_for
from tests.integration.conftest import WorkerThread
from tests.integration.sync_support import caught_up, chunk_texts, index, source
from tests.integration.workflow_support import log_tails, settle, start_step, stop_all

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
ARTICLES = "app.articles"
MODULE_DOCS = "app.module_docs"
StartWorker = Callable[..., WorkerThread]


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The browser and selenium talk to 127.0.0.1 only; a proxy setting must not apply."""
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        if name in os.environ:
            monkeypatch.delenv(name)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


class WebServer:
    """The Flask app on a real socket (werkzeug's threaded server) in a background thread."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.server: BaseWSGIServer = make_server("127.0.0.1", 0, app, threaded=True)
        self.thread = threading.Thread(
            target=self.server.serve_forever, name="freshet-web-e2e", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(timeout=30)
        self.server.server_close()
        close_app(self.app)


@pytest.fixture
def web_server(running_stack: Settings) -> Iterator[WebServer]:
    # The test asks again every 0.2 s until the update is cited: more than a person asks, and
    # more than the default ask limit admits from one address.
    app = create_app({"POOL_MAX_SIZE": 4, "RATE_LIMIT_BACKEND": "off"}, settings=running_stack)
    server = WebServer(app)
    server.thread.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[WebDriver]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail(
            "the web UI test needs Chromium: apt-get install -y chromium chromium-driver"
            " (.ci/run installs them)"
        )
    # Selenium manager must never reach the network: binary and driver are given explicitly.
    monkeypatch.setenv("SE_OFFLINE", "true")
    profile = tempfile.mkdtemp(prefix="freshet-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,1000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def ask(driver: WebDriver, question: str) -> tuple[str, list[str], str]:
    """Type the question and press Enter; wait for the streamed answer to finish.

    Returns the answer text, the citation links' hrefs, and the error line."""
    box = driver.find_element(By.ID, "question")
    box.clear()
    box.send_keys(question)
    box.send_keys(Keys.ENTER)

    # Pressing Enter clears the citations and sets aria-busy synchronously: whatever is shown
    # once the answer is no longer busy and has sources (or an error) is this ask's result.
    def finished(d: WebDriver) -> bool:
        busy = d.find_element(By.ID, "answer").get_attribute("aria-busy")
        sources = d.find_elements(By.CSS_SELECTOR, "#citations li a")
        error = d.find_element(By.ID, "ask-error").text
        return busy == "false" and bool(sources or error)

    WebDriverWait(driver, 30, poll_frequency=0.05).until(finished)
    answer = driver.find_element(By.ID, "answer").text
    hrefs = [
        a.get_dom_attribute("href") or ""
        for a in driver.find_elements(By.CSS_SELECTOR, "#citations li a")
    ]
    return answer, hrefs, driver.find_element(By.ID, "ask-error").text


def screenshot(driver: WebDriver, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    assert driver.save_screenshot(str(path)), f"could not save {path}"
    print(f"screenshot: {path}")
    return path


def test_ask_page_cites_a_committed_row_and_its_update(
    running_stack: Settings,
    start_worker: StartWorker,
    web_server: WebServer,
    browser: WebDriver,
) -> None:
    worker = start_worker()
    caught_up(worker)
    key = 880_000_000 + uuid.uuid4().int % 100_000_000
    before = "The harbour ferry to Nordholm leaves at 07:15 every weekday."
    after = "The harbour ferry to Nordholm leaves at 08:40 every weekday."
    question = "When does the harbour ferry to Nordholm leave?"
    cited = f"/documents/{ARTICLES}/{key}#chunk-"
    with source(running_stack) as src, index(running_stack) as idx:
        try:
            src.execute(
                "INSERT INTO app.articles (id, title, body) VALUES (%s, 'Nordholm ferry', %s)",
                (key, before),
            )
            assert wait_for(lambda: before in " ".join(chunk_texts(idx, ARTICLES, key)), 30), (
                "the inserted row was not indexed within 30 s"
            )

            browser.get(web_server.url + "/")
            assert "Ask" in browser.title
            answer, hrefs, error = ask(browser, question)
            screenshot(browser, "web-e2e-before-update.png")
            assert not error, error
            assert "07:15" in answer, answer
            assert any(h.startswith(cited) for h in hrefs), hrefs

            src.execute("UPDATE app.articles SET body = %s WHERE id = %s", (after, key))
            committed = time.monotonic()  # autocommit: the UPDATE has committed on return
            attempts = 0
            while True:
                attempts += 1
                answer, hrefs, error = ask(browser, question)
                if "08:40" in answer and any(h.startswith(cited) for h in hrefs):
                    break
                assert time.monotonic() - committed < 5, (
                    f"the update was not cited within 5 s of its commit ({attempts} asks);"
                    f" last answer {answer!r}, sources {hrefs}, error {error!r}"
                )
                time.sleep(0.2)
            elapsed = time.monotonic() - committed
            screenshot(browser, "web-e2e-after-update.png")
            assert elapsed < 5, f"the update was cited only {elapsed:.1f} s after its commit"
            assert "07:15" not in answer, answer
            print(f"update cited {elapsed:.2f} s after its commit ({attempts} asks)")

            # The citation opens the document view at the cited chunk, showing the new text.
            link = browser.find_element(By.CSS_SELECTOR, f'#citations a[href^="{cited}"]')
            link.click()
            WebDriverWait(browser, 15).until(
                lambda d: "08:40" in d.find_element(By.ID, "doc-chunks").text
            )
            assert browser.find_element(By.ID, "doc-error").text == ""
        finally:
            src.execute("DELETE FROM app.articles WHERE id = %s", (key,))


def test_a_queued_ask_shows_each_step_as_it_finishes_then_the_answer(
    running_stack: Settings,
    running_stack_env: dict[str, str],
    start_worker: StartWorker,
    web_server: WebServer,
    browser: WebDriver,
    tmp_path: Path,
) -> None:
    """An anonymous asker ticks "Queue it": the request goes through Kafka to the default
    workflow's own `answer` and `validate` workers, and the page lists the steps done, then
    the approved answer with its citation."""
    caught_up(start_worker())
    key = 880_000_000 + uuid.uuid4().int % 100_000_000
    text = "The Nordholm lighthouse lamp is lit at 16:20 in December."
    logs = {name: tmp_path / f"{name}.log" for name in ("answer", "validate")}
    workers = {name: start_step(running_stack_env, name, None, log) for name, log in logs.items()}
    with source(running_stack) as src, index(running_stack) as idx:
        try:
            src.execute(
                "INSERT INTO app.articles (id, title, body) VALUES (%s, 'Nordholm lamp', %s)",
                (key, text),
            )
            assert wait_for(lambda: text in " ".join(chunk_texts(idx, ARTICLES, key)), 30)
            # The ask's deadline (FRESHET_ASK_DEADLINE_S) is for answering, not for a worker's
            # start: ask once both hold their topic's partitions.
            settle(
                workers,
                logs,
                lambda name: start_step(running_stack_env, name, None, logs[name]),
                "partitions assigned: rag.",
            )
            browser.get(web_server.url + "/")
            browser.find_element(By.ID, "ask-async").click()
            box = browser.find_element(By.ID, "question")
            box.send_keys("When is the Nordholm lighthouse lamp lit?")
            box.send_keys(Keys.ENTER)

            def finished(d: WebDriver) -> bool:
                busy = d.find_element(By.ID, "answer").get_attribute("aria-busy")
                sources = d.find_elements(By.CSS_SELECTOR, "#citations li a")
                return busy == "false" and bool(sources or d.find_element(By.ID, "ask-error").text)

            WebDriverWait(browser, 180, poll_frequency=0.1).until(finished)
            screenshot(browser, "web-e2e-queued-ask.png")
            error = browser.find_element(By.ID, "ask-error").text
            assert error == "", f"{error}\n{log_tails(logs)}"
            assert "16:20" in browser.find_element(By.ID, "answer").text
            done = [
                li.get_dom_attribute("data-step")
                for li in browser.find_elements(By.CSS_SELECTOR, "#ask-steps li.done")
            ]
            assert done == ["answer", "validate"], done
            hrefs = [
                a.get_dom_attribute("href") or ""
                for a in browser.find_elements(By.CSS_SELECTOR, "#citations li a")
            ]
            assert any(h.startswith(f"/documents/{ARTICLES}/{key}#chunk-") for h in hrefs), hrefs
        finally:
            src.execute("DELETE FROM app.articles WHERE id = %s", (key,))
            stop_all(workers.values())


def test_status_page_without_a_token_says_which_demo_token_to_paste(
    web_server: WebServer, browser: WebDriver
) -> None:
    browser.get(web_server.url + "/status")
    assert "Status" in browser.title
    hint = browser.find_element(By.ID, "status-hint")
    # Without a token the admin status API refuses; the hint stays, naming the demo token.
    WebDriverWait(browser, 15).until(
        lambda d: d.find_element(By.ID, "status-error").text.startswith("403")
    )
    assert hint.is_displayed()
    assert "demo-admin" in hint.text and "API token" in hint.text, hint.text
    screenshot(browser, "web-e2e-status-hint.png")

    # Doing what it says loads the status at once, and the hint steps aside.
    box = browser.find_element(By.ID, "token")
    box.send_keys("demo-admin")
    box.send_keys(Keys.ENTER)
    WebDriverWait(browser, 30).until(
        lambda d: "postgres" in d.find_element(By.CSS_SELECTOR, "#components tbody").text
    )
    WebDriverWait(browser, 5).until(lambda d: not hint.is_displayed())
    assert browser.find_element(By.ID, "status-error").text == ""
    WebDriverWait(browser, 15).until(
        lambda d: "demo-admin (admin)" in d.find_element(By.ID, "whoami").text
    )


def demo_module_in_index(settings: Settings) -> ModuleDoc:
    """A public demo module docstring that the index holds (named by a single word)."""
    with index(settings) as idx:
        for row in module_doc_rows():
            public = not row.access_groups and "." not in row.name
            if public and chunk_texts(idx, MODULE_DOCS, row.name):
                return row
    pytest.fail("no public demo module docstring is in the index")


def search_results(driver: WebDriver) -> list[str]:
    """Wait for the search to finish; the result links' hrefs (fails on a search error)."""

    def finished(d: WebDriver) -> bool:
        busy = d.find_element(By.ID, "results").get_attribute("aria-busy")
        return busy == "false" and bool(
            d.find_elements(By.CSS_SELECTOR, "#results li a")
            or d.find_element(By.ID, "search-error").text
        )

    WebDriverWait(driver, 30, poll_frequency=0.05).until(finished)
    error = driver.find_element(By.ID, "search-error").text
    assert not error, error
    return [
        a.get_dom_attribute("href") or ""
        for a in driver.find_elements(By.CSS_SELECTOR, "#results li a")
    ]


def test_search_link_runs_its_search_and_the_form_keeps_the_link(
    running_stack: Settings,
    start_worker: StartWorker,
    web_server: WebServer,
    browser: WebDriver,
) -> None:
    caught_up(start_worker())
    doc = demo_module_in_index(running_stack)
    found = f"/documents/{MODULE_DOCS}/{doc.name}#chunk-"

    # Opening the link fills the form and searches: nothing is typed.
    browser.get(web_server.url + "/search?" + urlencode({"q": doc.name, "mode": "text"}))
    assert "Search" in browser.title
    assert browser.find_element(By.ID, "q").get_attribute("value") == doc.name
    mode = browser.find_element(By.ID, "mode")
    assert mode.get_attribute("value") == "text"
    hrefs = search_results(browser)
    screenshot(browser, "web-e2e-search-link.png")
    assert any(h.startswith(found) for h in hrefs), hrefs

    # A search run from the form puts its own link in the address bar...
    query = f"{doc.name} {doc.summary}"
    box = browser.find_element(By.ID, "q")
    box.clear()
    box.send_keys(query)
    box.send_keys(Keys.ENTER)
    WebDriverWait(browser, 15).until(
        lambda d: parse_qs(urlsplit(d.current_url).query).get("q") == [query]
    )
    hrefs = search_results(browser)
    assert any(h.startswith(found) for h in hrefs), hrefs
    link = browser.current_url
    params = parse_qs(urlsplit(link).query)
    assert urlsplit(link).path == "/search"
    assert params["q"] == [query] and params["mode"] == ["text"], params

    # ...and that link, opened afresh, runs the same search again.
    browser.get(link)
    assert browser.find_element(By.ID, "q").get_attribute("value") == query
    assert browser.find_element(By.ID, "mode").get_attribute("value") == "text"
    assert any(h.startswith(found) for h in search_results(browser))
