"""The chat page at `/`: its files over plain HTTP (served, public, self-contained), then the page itself in a
real headless Chromium driven by selenium against a real server on the tiny model: a streamed reply equal
to the API's, the model name, Stop, reload, New chat, error display and the API-key flow.

The browser tests need Debian's chromium and chromium-driver (`apt-get install -y chromium chromium-driver`)
and selenium (`pip install -e ".[dev]"`). Without them they skip, unless CI or KVGRAPH_REQUIRE_BROWSER is
set (`.ci/run` sets it): then a missing browser is a failure, not a silent skip.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")

from test_server import start_server, stop  # noqa: E402  (the same real-process server the API tests use)

from kvgraph.server.chat_page import STATIC_DIR, is_public  # noqa: E402

KEY = "s3cret"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
INSTALL_HINT = "apt-get install -y chromium chromium-driver && pip install selenium"


@pytest.fixture(scope="module")
def page_server(tiny_llama):
    # a context far longer than any machine fills during the test, so a reply without max_tokens is still
    # streaming when the test clicks Stop (its cells are only taken as the reply grows)
    proc, base = start_server(tiny_llama[0], "--parallel", "2", "--kv-unified-per-slot", "1048576")
    yield base
    stop(proc)


@pytest.fixture(scope="module")
def key_server(tiny_llama):
    proc, base = start_server(tiny_llama[0], "--parallel", "1", "-c", "256", "--api-key", KEY)
    yield base
    stop(proc)


# ---- plain HTTP ---------------------------------------------------------------------------------------------

def test_page_and_static_files_are_served(page_server):
    r = httpx.get(page_server + "/")
    assert r.status_code == 200 and r.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'self'" in r.headers["content-security-policy"]
    html = r.text
    assert "<title>kvgraph chat</title>" in html
    for asset, kind in (("static/chat.js", "javascript"), ("static/chat.css", "text/css")):
        assert f'"{asset}"' in html
        a = httpx.get(f"{page_server}/{asset}")
        assert a.status_code == 200 and kind in a.headers["content-type"]
        assert a.content == (STATIC_DIR / asset.split("/")[1]).read_bytes()
    assert httpx.get(page_server + "/static/missing.js").status_code == 404
    assert httpx.post(page_server + "/").status_code == 405


def test_page_files_load_nothing_from_another_host():
    """The page works offline: no URL to any host in its files, and every src/href is relative or data:."""
    files = sorted(STATIC_DIR.iterdir())
    assert {f.name for f in files} >= {"index.html", "chat.js", "chat.css"}
    for f in files:
        text = f.read_text(encoding="utf-8")
        assert not re.search(r"https?://|wss?://", text, re.I), f"{f.name} names a URL"
        assert not re.search(r"@import|url\(\s*['\"]?(?!data:)", text, re.I), f"{f.name} loads a resource"
        for ref in re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", text, re.I):
            assert ref.startswith("data:") or not re.match(r"[a-z]+:|//", ref, re.I), (f.name, ref)
        for ref in re.findall(r"""fetch\(\s*["'`]([^"'`]*)""", text):
            assert not re.match(r"[a-z]+:|/", ref, re.I), (f.name, ref)   # relative: this server only


def test_page_is_public_but_the_api_still_needs_the_key(key_server):
    for path in ("/", "/static/chat.js", "/static/chat.css"):
        assert httpx.get(key_server + path).status_code == 200, path
    assert httpx.get(key_server + "/static/missing.css").status_code == 404
    assert httpx.get(key_server + "/v1/models").status_code == 401
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    for path in ("/v1/chat/completions", "/chat/completions", "/"):
        assert httpx.post(key_server + path, json=body).status_code == 401, path
    assert httpx.get(key_server + "/props").status_code == 401
    assert raw_get_status(key_server, "/static/../v1/models") == 401       # no way round the key through /static
    ok = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(key_server + "/v1/models", headers=ok).status_code == 200
    assert httpx.post(key_server + "/v1/chat/completions", json=body, headers=ok).status_code == 200


def test_is_public():
    assert is_public("GET", "/") and is_public("HEAD", "/static/chat.js")
    assert not is_public("POST", "/") and not is_public("GET", "/v1/models")
    assert not is_public("GET", "/static/../v1/models") and not is_public("GET", "/staticx")
    assert not is_public("GET", "/static")


def raw_get_status(base: str, path: str) -> int:
    """GET path exactly as written (httpx would resolve the '..')."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        return int(s.makefile("rb").readline().split()[1])


# ---- in a real browser --------------------------------------------------------------------------------------

def _browser_missing(why: str):
    if os.environ.get("CI") or os.environ.get("KVGRAPH_REQUIRE_BROWSER"):
        pytest.fail(f"the chat page's browser test cannot run: {why} (install: {INSTALL_HINT})")
    pytest.skip(f"{why}; to run the browser test: {INSTALL_HINT}")


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _browser_missing("selenium is not installed")
    chrome = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver_path = shutil.which("chromedriver")
    if not chrome or not driver_path:
        _browser_missing("chromium or chromedriver is not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = chrome
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1000,760", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for(driver, condition, what: str, timeout: float = 30):
    """Polls condition(driver) until it is truthy (its value is returned); fails naming what it waited for."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)
    except TimeoutException:
        error = driver.execute_script("return document.getElementById('error').textContent")
        pytest.fail(f"timed out after {timeout} s waiting for {what} (page error box: {error!r})")


def js(driver, script: str, *args):
    return driver.execute_script(script, *args)


def stored_messages(driver) -> list[dict]:
    return json.loads(js(driver, "return localStorage.getItem('kvgraph.chat.messages') || '[]'"))


def by_id(driver, element_id: str):
    from selenium.webdriver.common.by import By
    return driver.find_element(By.ID, element_id)


def messages_shown(driver) -> list[tuple[str, str]]:
    return [tuple(x) for x in js(driver, """return [...document.querySelectorAll('#messages .msg')].map(
        m => [m.classList.contains('user') ? 'user' : 'assistant', m.querySelector('.content').textContent])""")]


def open_fresh(driver, base: str) -> None:
    """The page with nothing in this origin's storage."""
    driver.get(base + "/")
    js(driver, "localStorage.clear()")
    driver.get(base + "/")


def set_field(driver, element_id: str, value: str) -> None:
    el = by_id(driver, element_id)
    el.clear()
    if value:
        el.send_keys(value)
    else:    # clear() fires no input event: the page would keep the old setting
        js(driver, "arguments[0].dispatchEvent(new Event('input'))", el)


def send_message(driver, text: str) -> int:
    """Types text and sends it with Enter; returns how many messages the page showed before."""
    from selenium.webdriver.common.keys import Keys
    before = len(messages_shown(driver))
    box = by_id(driver, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)
    return before


def screenshot(driver, tmp_path: Path, name: str, record_property) -> Path:
    path = tmp_path / name
    driver.save_screenshot(str(path))
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(path, ARTIFACTS / name)
    record_property("screenshot", str(ARTIFACTS / name))
    print(f"screenshot: {path} (copy: {ARTIFACTS / name})")
    return path


def test_chat_in_a_browser(browser, page_server, tmp_path, record_property):
    """Stream a reply, stop a long one, reload, show a server error, start a new chat."""
    d = browser
    t0 = time.monotonic()
    open_fresh(d, page_server)
    wait_for(d, lambda d: by_id(d, "model-name").text == "tiny", "the model name from /v1/models")
    assert d.title == "tiny · kvgraph chat"

    by_id(d, "settings-toggle").click()
    set_field(d, "temperature", "0")
    set_field(d, "max-tokens", "12")
    set_field(d, "system-prompt", "You are terse.")
    set_field(d, "extra-json", '{"ignore_eos": true}')

    # 1. a streamed reply: what the page shows and stores is what the API answers without streaming
    send_message(d, "hello there")
    wait_for(d, lambda d: js(d, "return document.querySelector('.msg.assistant[data-done]')"), "the reply to end")
    shown = messages_shown(d)
    stored = stored_messages(d)
    want = httpx.post(page_server + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello there"}],
        "temperature": 0, "max_tokens": 12, "ignore_eos": True}).json()["choices"][0]["message"]["content"]
    assert [(m["role"], m["content"]) for m in stored] == [("user", "hello there"), ("assistant", want)]
    assert shown[0] == ("user", "hello there") and shown[1][1] == want and want
    assert stored[1]["note"] == "stopped at max tokens"
    assert re.fullmatch(r"last reply: 12 tokens, [\d.]+ tokens/s · prompt \d+ tokens.*", by_id(d, "timings").text)
    assert by_id(d, "error").get_attribute("hidden") is not None

    # 2. Stop: a reply with no max_tokens runs until its 1M-token context is full; Stop ends it in the page and on
    # the server (the slot is freed), and keeps what came so far
    set_field(d, "max-tokens", "")
    send_message(d, "tell me a long story")
    wait_for(d, lambda d: js(d, """const m = document.querySelectorAll('.msg.assistant')[1];
        return document.body.dataset.state === 'streaming' && m && m.querySelector('.content').textContent.length > 40"""),
             "the second reply to stream")
    by_id(d, "stop").click()
    wait_for(d, lambda d: js(d, "return document.body.dataset.state") == "idle", "Stop to end the stream")
    wait_for(d, lambda d: httpx.get(page_server + "/health").json()["active"] == 0,
             "the server to free the stopped request's slot")
    stored = stored_messages(d)
    assert len(stored) == 4 and stored[3]["note"] == "stopped" and stored[3]["content"]
    assert by_id(d, "send").is_displayed() and not by_id(d, "stop").is_displayed()
    assert "tokens/s (measured in the browser)" in by_id(d, "timings").text
    assert messages_shown(d)[3][1] == stored[3]["content"]     # nothing arrived after Stop

    # 3. reload: the conversation and the settings come back from localStorage
    d.refresh()
    wait_for(d, lambda d: len(messages_shown(d)) == 4, "the conversation after a reload")
    assert [m[1] for m in messages_shown(d)] == [m["content"] for m in stored]
    assert by_id(d, "temperature").get_attribute("value") == "0"
    assert by_id(d, "system-prompt").get_attribute("value") == "You are terse."
    wait_for(d, lambda d: by_id(d, "model-name").text == "tiny", "the model name after a reload")
    path = screenshot(d, tmp_path, "chat_page.png", record_property)
    assert path.stat().st_size > 1000
    severe = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe        # no script error, nothing the CSP blocked

    # 4. a server error shows in the page; the message goes back in the box to send again
    by_id(d, "settings-toggle").click()
    set_field(d, "extra-json", '{"ignore_eos": true, "best_of": 2}')
    send_message(d, "this one fails")
    error = wait_for(d, lambda d: by_id(d, "error").is_displayed() and by_id(d, "error").text, "the error box")
    assert error.startswith("Server error 400: ") and "best_of" in error
    assert len(messages_shown(d)) == 4 and by_id(d, "input").get_attribute("value") == "this one fails"
    assert len(stored_messages(d)) == 4

    # 5. New chat empties the conversation, here and in storage
    by_id(d, "new-chat").click()
    assert messages_shown(d) == [] and stored_messages(d) == []
    assert "Start a conversation with tiny." in by_id(d, "messages").text
    print(f"browser test: {time.monotonic() - t0:.1f} s")


def test_api_key_in_a_browser(browser, key_server, tmp_path, record_property):
    """The page asks for the key; a wrong one is refused with a clear message; with the right one a reply
    comes, and the key is kept for the next visit."""
    d = browser
    open_fresh(d, key_server)
    panel = wait_for(d, lambda d: by_id(d, "api-key-panel").is_displayed() and by_id(d, "api-key-message").text,
                     "the page to ask for the API key")
    assert "requires an API key" in panel and by_id(d, "model-name").text == "model: ?"

    send_message(d, "hi")             # without a key: 401, shown, the message back in the box
    error = wait_for(d, lambda d: by_id(d, "error").is_displayed() and by_id(d, "error").text, "the 401 message")
    assert "requires an API key (401 Unauthorized)" in error and "invalid or missing API key" in error
    assert by_id(d, "input").get_attribute("value") == "hi" and messages_shown(d) == []

    set_field(d, "api-key", "wrong")
    by_id(d, "api-key-save").click()
    wait_for(d, lambda d: "refused this API key" in by_id(d, "api-key-message").text, "the wrong key refused")

    set_field(d, "api-key", KEY)
    by_id(d, "api-key-save").click()
    wait_for(d, lambda d: not by_id(d, "api-key-panel").is_displayed(), "the key panel to close")
    wait_for(d, lambda d: by_id(d, "model-name").text == "tiny", "the model name once the key is given")
    by_id(d, "settings-toggle").click()
    set_field(d, "max-tokens", "4")
    set_field(d, "extra-json", '{"ignore_eos": true}')
    set_field(d, "input", "")
    send_message(d, "hi")
    wait_for(d, lambda d: js(d, "return document.querySelector('.msg.assistant[data-done]')"), "the reply to end")
    stored = stored_messages(d)
    assert [m["role"] for m in stored] == ["user", "assistant"] and stored[1]["content"]
    assert stored[1]["note"] == "stopped at max tokens" and not by_id(d, "error").is_displayed()

    d.refresh()                       # the key is remembered
    wait_for(d, lambda d: by_id(d, "model-name").text == "tiny", "the model name with the stored key")
    assert not by_id(d, "api-key-panel").is_displayed()
    assert js(d, "return localStorage.getItem('kvgraph.chat.apiKey')") == KEY
    screenshot(d, tmp_path, "chat_page_api_key.png", record_property)
