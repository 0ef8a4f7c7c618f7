"""Two real browser tabs on the chat page, served by different replicas, chat with each other."""

from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from tests.integration.running_stack import local_stack  # noqa: F401 (fixture)
from tests.required import unavailable

pytestmark = [pytest.mark.browser, pytest.mark.stack]
# Debian's chromium (Makefile SYSTEM_PACKAGES); playwright never downloads a browser here.
CHROMIUM = Path("/usr/bin/chromium")
ROOM = "browsers"


@pytest.fixture
def browser():
    if not CHROMIUM.exists():
        unavailable(f"{CHROMIUM} is missing: apt-get install chromium (make system-packages does it as root)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-background-networking"]
        )
        try:
            yield chromium
        finally:
            chromium.close()


def open_room(context, url):
    page = context.new_page()
    page.goto(f"{url}/chat/{ROOM}/")
    expect(page.locator("#status")).to_have_attribute("data-state", "open")
    return page, page.locator("#served-by").inner_text()


def say(page, text):
    page.locator("#message").fill(text)
    page.locator("#message").press("Enter")


def test_two_tabs_on_different_replicas_see_each_others_messages(local_stack, browser):  # noqa: F811
    context = browser.new_context()
    first, first_pod = open_room(context, local_stack.url)
    # The first tab holds a socket, so least_conn sends the second elsewhere.
    second, second_pod = open_room(context, local_stack.url)
    assert {first_pod, second_pod} <= set(local_stack.replica_names)
    assert first_pod != second_pod

    say(first, "hello from the first tab")
    expect(second.locator("#log li").last).to_contain_text("hello from the first tab")
    expect(second.locator("#log li").last).to_contain_text(f"{first_pod} → {second_pod}")

    say(second, "hello back from the second tab")
    expect(first.locator("#log li").last).to_contain_text("hello back from the second tab")
    expect(first.locator("#log li").last).to_contain_text(f"{second_pod} → {first_pod}")
    # Each tab sees its own message once too, delivered by its own replica.
    expect(first.locator("#log li")).to_have_count(2)
    expect(second.locator("#log li")).to_have_count(2)
    context.close()


def test_a_tab_whose_replica_dies_resumes_and_shows_what_it_missed(local_stack, browser):  # noqa: F811
    away, staying = browser.new_context(), browser.new_context()
    first, first_pod = open_room(away, local_stack.url)
    second, _ = open_room(staying, local_stack.url)
    say(second, "before")
    expect(first.locator("#log li").last).to_contain_text("before")

    # The first tab's replica dies and the tab cannot reconnect (offline)
    # while the room goes on; back online, it resumes on another replica.
    away.set_offline(True)
    local_stack.kill_replica(first_pod)
    expect(first.locator("#status")).not_to_have_attribute("data-state", "open")
    say(second, "while you were away")
    expect(second.locator("#log li").last).to_contain_text("while you were away")
    away.set_offline(False)
    expect(first.locator("#status")).to_have_attribute("data-state", "open", timeout=20_000)
    expect(first.locator("#log")).to_contain_text("recovered 1 missed message")
    expect(first.locator("#log li").last).to_contain_text("while you were away")
    texts = first.locator("#log li").all_inner_texts()
    assert sum("while you were away" in text for text in texts) == 1, texts
    assert sum(text.startswith("before") for text in texts) == 1, texts
    away.close()
    staying.close()
