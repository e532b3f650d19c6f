"""The dashboard in a real headless browser: Debian's chromium, driven by Playwright.

A gateway serves the page and two node processes run the test agents; the page must
show them, a task and its events, a node killed with SIGKILL, a dead letter redriven
with its button, and ask for an API key once keys exist. Screenshots of each stage go
to the test's tmp_path and to test-artifacts/ (git-ignored) for a person to look at.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Page, async_playwright, expect

from shoal import Client, Settings
from shoal.apikeys import KeyStore

from .conftest import REPO, eventually, node_process, wait_for_status
from .gateways import serving

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
ARTIFACTS = REPO / "test-artifacts"
WAIT_MS = 15_000  # the longest any expectation waits: polls are about 1 s apart

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"no browser at {CHROMIUM}: install Debian's chromium (apt-get install -y "
    "chromium; .ci/run does)",
)


class Dashboard:
    """The page in the browser, uncaught script errors, and screenshots."""

    def __init__(self, page: Page, shots: Path) -> None:
        self.page = page
        self.shots = shots
        self.script_errors: list[str] = []
        page.on("pageerror", lambda error: self.script_errors.append(str(error)))

    async def screenshot(self, name: str) -> None:
        path = self.shots / f"dashboard-{name}.png"
        await self.page.evaluate("window.scrollTo(0, 0)")  # the sticky header on top
        await self.page.screenshot(path=path, full_page=True)
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(path, ARTIFACTS / path.name)

    def node_row(self, node_id: str) -> Any:
        return self.page.locator(f'#nodes-body tr[data-node-id="{node_id}"]')

    def task_row(self, task_id: str) -> Any:
        return self.page.locator(f'#tasks-body tr[data-task-id="{task_id}"]')


@contextlib.asynccontextmanager
async def dashboard(url: str, tmp_path: Path) -> AsyncIterator[Dashboard]:
    """The dashboard at ``url`` in a headless chromium with a fresh profile."""
    expect.set_options(timeout=WAIT_MS)
    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            tmp_path / "chromium-profile",
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1440, "height": 1000},
        )
        try:
            page = context.pages[0] if context.pages else await context.new_page()
            page.set_default_timeout(WAIT_MS)
            board = Dashboard(page, tmp_path)
            await page.goto(url)
            yield board
            assert not board.script_errors, f"the page raised: {board.script_errors}"
        finally:
            await context.close()


async def node_ids(client: Client, want: int) -> list[str]:
    async def registered() -> list[str] | None:
        nodes = (await client.cluster()).nodes
        return [n.id for n in nodes if n.state == "alive"] if len(nodes) >= want else None

    return await eventually(registered, f"{want} nodes registered", timeout=20)


async def test_the_dashboard_shows_nodes_tasks_events_a_killed_node_and_redrives(
    settings: Settings, client: Client, tmp_path: Path
) -> None:
    with node_process(settings) as first, node_process(settings):
        ids = await node_ids(client, 2)
        async with serving(settings) as url, dashboard(url, tmp_path) as board:
            page = board.page
            for node_id in ids:
                await expect(board.node_row(node_id)).to_have_attribute("data-state", "alive")
            await expect(page.locator("#connection")).to_have_text("live")
            await expect(page.locator("#namespace")).to_have_text(settings.namespace)

            async with httpx.AsyncClient(base_url=url) as http:
                answer = await http.post(
                    "/v1/tasks", params={"wait": 10},
                    json={"capability": "report", "args": {"steps": 3}},
                )  # fmt: skip
            assert answer.status_code == 201, answer.text
            task_id = answer.json()["id"]
            row = board.task_row(task_id)
            await expect(row).to_have_attribute("data-status", "succeeded")
            await board.screenshot("cluster")

            await row.click()
            detail = page.locator("#detail")
            await expect(detail).to_be_visible()
            await expect(page.locator("#detail-id")).to_have_text(task_id)
            await expect(detail.locator(".detail-head")).to_contain_text("succeeded")
            progress = page.locator('#detail-events li[data-kind="progress"]')
            await expect(progress).to_have_count(3)
            await expect(page.locator('#detail-events li[data-kind="log"]')).to_contain_text(
                "all steps done"
            )
            await expect(page.locator('#detail-events li[data-kind="done"]')).to_contain_text(
                "succeeded"
            )
            await expect(page.locator("#detail-stream")).to_contain_text("EventSource")
            await board.screenshot("task")
            await detail.locator(".close").click()
            await expect(detail).to_be_hidden()

            killed = next(n.id for n in (await client.cluster()).nodes if n.pid == first.pid)
            first.kill()  # SIGKILL: no goodbye, only silence
            first.wait()
            await expect(board.node_row(killed)).to_have_attribute(
                "data-state", re.compile("^(suspect|dead)$")
            )
            survivor = next(i for i in ids if i != killed)
            await expect(board.node_row(survivor)).to_have_attribute("data-state", "alive")
            await expect(board.node_row(killed)).to_have_attribute("data-state", "dead")
            await board.screenshot("node-killed")

            handle = await client.submit("always_fails")
            await wait_for_status(handle, "dead")
            letters = page.locator('#dead-letters .dlq[data-capability="always_fails"]')
            letter = letters.locator(f'tr[data-task-id="{handle.id}"]')
            await letter.get_by_role("button", name="Redrive").click()
            await expect(letters.locator(".notice")).to_have_text("Redriven: 1 task queued again.")
            await board.screenshot("redriven")
            kinds = [e.kind for e in await client.event_history(handle.id)]
            assert "redriven" in kinds


async def test_the_dashboard_asks_for_an_api_key_then_shows_the_cluster_with_it(
    settings: Settings, client: Client, tmp_path: Path
) -> None:
    reader = await KeyStore(client).create("dashboard", ["read"])
    with node_process(settings):
        (node_id,) = await node_ids(client, 1)
        async with serving(settings) as url, dashboard(url, tmp_path) as board:
            page = board.page
            await expect(page.locator("#key-panel")).to_be_visible()
            await expect(page.locator("#key-message")).to_contain_text("an API key is required")
            await expect(page.locator("#connection")).to_have_text("unauthorized")
            await board.screenshot("key-prompt")

            await page.locator("#key-input").fill(reader.secret)
            await page.get_by_role("button", name="Use key").click()
            await expect(board.node_row(node_id)).to_have_attribute("data-state", "alive")
            await expect(page.locator("#connection")).to_have_text("live")
            await expect(page.locator("#key-panel")).to_be_hidden()

            handle = await client.submit("report", steps=2)
            await wait_for_status(handle, "succeeded")
            await board.task_row(handle.id).click()
            await expect(page.locator('#detail-events li[data-kind="done"]')).to_be_visible()
            await expect(page.locator("#detail-stream")).to_contain_text("fetch stream")
            await page.locator("#detail .close").click()

            dead = await client.submit("always_fails")
            await wait_for_status(dead, "dead")
            letters = page.locator('#dead-letters .dlq[data-capability="always_fails"]')
            await letters.get_by_role("button", name=re.compile("^Redrive all")).click()
            await expect(letters.locator(".notice")).to_contain_text(
                "403 Forbidden: API key 'dashboard' lacks the 'admin' scope"
            )
            await expect(letters.locator("h3")).to_have_text("always_fails — 1 dead")
            await board.screenshot("key-forbidden")
