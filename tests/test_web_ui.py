"""The web UI in a real browser: Debian's chromium driven by Playwright (its own browser download
cannot reach the internet here), against the in-process farm with a real local agent.

Screenshots of each step are kept in ``test-artifacts/web-ui/`` at the repository root."""

from __future__ import annotations

import asyncio
import os
import shutil
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Farm

CHROMIUM = os.environ.get("RENDERFARM_TEST_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "web-ui"
PASSWORD = "grace-Hopper-1906"
pytestmark = [pytest.mark.blender, pytest.mark.slow]

playwright_api = pytest.importorskip("playwright.async_api", reason="pip install -e '.[dev]' has playwright")


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    if not shutil.which(CHROMIUM) and not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} not found: apt-get install chromium (.ci/run does)")
    async with playwright_api.async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            await b.close()


async def user(farm: Farm, name: str, project: str, role: str = "artist") -> None:
    await farm.client.create_user(name, PASSWORD)
    await farm.client.set_member(project, name, role)


async def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def login(page: Any, url: str, name: str, password: str = PASSWORD) -> None:
    await page.goto(url + "/")
    await page.get_by_label("User name").fill(name)
    await page.get_by_label("Password").fill(password)
    await page.get_by_role("button", name="Log in").click()
    await page.get_by_role("heading", name="Jobs").wait_for()


async def test_submit_watch_gallery_and_zip_in_a_browser(
    farm: Farm, browser: Any, sample_blend: Path, tmp_path: Path
) -> None:
    await user(farm, "grace", "default")
    await farm.client.create_project("other")
    await user(farm, "linus", "other")
    context = await browser.new_context(accept_downloads=True, viewport={"width": 1366, "height": 768})
    page = await context.new_page()
    problems: list[str] = []  # script errors, CSP violations, 5xx answers (4xx ones are UI paths)
    page.on("console", lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("response", lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 500 else None)
    loads: list[str] = []
    page.on("load", lambda p: loads.append(p.url))

    resp = await page.goto(farm.url + "/")
    csp = resp.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    health = await page.request.get(farm.url + "/healthz")
    assert health.headers["x-content-type-options"] == "nosniff"  # API answers too
    await login(page, farm.url, "grace")
    await shot(page, "01-jobs-empty")
    loads.clear()

    # submit the sample scene: upload with progress, the model's metadata, then the job
    await page.get_by_role("link", name="Submit").click()
    await page.get_by_label(".blend or .zip").set_input_files(str(sample_blend))
    await page.get_by_role("button", name="Upload").click()
    await page.get_by_role("button", name="Submit job").wait_for()
    assert await page.locator("#upload-progress").get_attribute("value") == "100"
    assert await page.get_by_text("no missing files").is_visible()
    await shot(page, "02-model")
    await page.get_by_label("Frames", exact=True).fill("1-2")
    await page.get_by_role("button", name="Submit job").click()
    await page.locator("h1 .state-completed").wait_for(timeout=240_000)  # live, no reload
    assert loads == [], loads  # the page never reloaded
    await page.locator("#gallery img[src^='blob:']").nth(1).wait_for()
    await shot(page, "03-job-completed")
    job_id = page.url.rsplit("/", 1)[-1]

    # the gallery's full-size view, then every frame as a zip
    await page.get_by_role("button", name="open frame 1").click()
    await page.locator("#viewer img").wait_for()
    await shot(page, "04-frame")
    await page.get_by_role("button", name="Close").click()
    async with page.expect_download() as info:
        await page.get_by_role("link", name="Download all (zip)").click()
    download = await info.value
    path = tmp_path / "frames.zip"
    await download.save_as(str(path))
    with zipfile.ZipFile(path) as zf:
        assert sorted(n.rsplit(".", 1)[-1] for n in zf.namelist()) == ["png", "png"]

    # the nodes page: the local agent, online, blocklisted for nothing
    await page.get_by_role("link", name="Nodes").click()
    await page.get_by_role("columnheader", name="Blocklisted for").wait_for()
    await page.locator("table tbody tr", has_text="online").first.wait_for()
    await shot(page, "06-nodes")

    # the jobs table shows it, completed
    await page.get_by_role("link", name="Jobs").click()
    row = page.locator("#jobs tbody tr", has_text="completed")
    await row.first.wait_for()
    assert problems == [], problems

    # an artist of another project neither lists it nor opens it
    other = await (await browser.new_context()).new_page()
    await login(other, farm.url, "linus")
    await other.locator("#jobs caption").wait_for()
    assert await other.locator("#jobs tbody tr").count() == 0
    await other.goto(f"{farm.url}/#/jobs/{job_id}")
    await other.get_by_role("status").filter(has_text="not found").wait_for()
    await shot(other, "05-other-project")
    await context.close()


@pytest.mark.agents(0)
async def test_admin_pages_audit_and_what_a_viewer_is_not_shown(
    farm: Farm, browser: Any, sample_blend: Path
) -> None:
    admin_pw = (farm.settings.data_dir / "secrets" / "initial-admin-password").read_text().strip()
    await user(farm, "vera", "default", role="viewer")
    model = await farm.client.upload_model(sample_blend, project="default")
    job = await farm.client.create_job(model_id=model["id"], frames="1-3")  # no agent: it stays queued

    # a viewer sees the job, but neither Cancel nor Priority nor the admin pages
    page = await (await browser.new_context()).new_page()
    await login(page, farm.url, "vera")
    await page.locator("#jobs tbody tr").first.wait_for()
    assert not await page.get_by_role("link", name="Admin").is_visible()
    assert not await page.get_by_role("link", name="Submit").is_visible()
    await page.get_by_role("link", name=job["name"]).click()
    await page.locator("h1 .state-queued").wait_for()
    await page.get_by_role("heading", name="Tasks").wait_for()
    assert await page.get_by_role("link", name="Download all (zip)").count() == 0  # no frame yet
    assert await page.get_by_role("button", name="Cancel job").count() == 0
    assert await page.get_by_label("Priority").count() == 0
    await shot(page, "10-viewer-job")

    # an agent blocklisted for the job (three failures recorded, as the failure policy does):
    # the admin's Nodes page names the job, the job page offers Clear
    from sqlalchemy import select

    from server.persistence.tables import Task, TaskFailure

    async with farm.ctx.db.session() as s:
        task_id = (await s.scalars(select(Task.id).where(Task.job_id == job["id"]))).first()
        for _ in range(3):
            s.add(
                TaskFailure(job_id=job["id"], task_id=task_id, agent="render-9", kind="crashed", message="x")
            )
        await s.commit()

    # the admin: users, projects and roles, an agent token, then cancels the job live
    admin = await (await browser.new_context()).new_page()
    await login(admin, farm.url, "admin", admin_pw)
    await admin.get_by_role("link", name="Admin").click()
    await admin.get_by_label("New user").fill("ada")
    await admin.get_by_label("Password").fill(PASSWORD)
    await admin.get_by_role("button", name="Create user").click()
    await admin.get_by_role("cell", name="ada", exact=True).wait_for()
    await admin.get_by_label("New project").fill("shots")
    await admin.get_by_role("button", name="Create project").click()
    await admin.get_by_role("cell", name="shots", exact=True).wait_for()
    await admin.get_by_label("User", exact=True).fill("ada")
    await admin.get_by_label("Project", exact=True).select_option(label="shots")
    await admin.get_by_label("Role").select_option("manager")
    await admin.get_by_role("button", name="Set role").click()
    await admin.get_by_role("cell", name="ada: manager").wait_for()
    await admin.get_by_label("Agent token for").fill("render07")
    await admin.get_by_role("button", name="Create agent token").click()
    await admin.get_by_text("token for render07 (shown once): rfa_").wait_for()
    await shot(admin, "11-admin")
    (ada,) = [u for u in (await farm.client._json("GET", "/api/users"))["users"] if u["username"] == "ada"]
    assert [(p["name"], p["role"]) for p in ada["projects"]] == [("shots", "manager")], ada

    await admin.get_by_role("link", name="Nodes").click()
    await admin.get_by_role("columnheader", name="Blocklisted for").wait_for()
    await admin.goto(f"{farm.url}/#/jobs/{job['id']}")
    await admin.get_by_role("button", name="Clear render-9").wait_for()
    await shot(admin, "13-blocklist")
    await admin.get_by_role("button", name="Clear render-9").click()
    await admin.get_by_role("heading", name="Blocklisted agents").wait_for(state="detached")
    await admin.get_by_role("button", name="Cancel job").click()
    await admin.locator("h1 .state-canceled").wait_for()
    # the viewer's page follows without a reload
    await page.locator("h1 .state-canceled").wait_for()

    # the audit log, filtered
    await admin.get_by_role("link", name="Audit log").click()
    await admin.get_by_label("Action").fill("jobs.cancel_job")
    await admin.get_by_role("button", name="Filter").click()
    await admin.locator("#audit tbody tr", has_text="jobs.cancel_job").first.wait_for()
    rows = await admin.locator("#audit tbody tr").all_inner_texts()
    assert rows and all("jobs.cancel_job" in r for r in rows), rows
    await shot(admin, "12-audit")


@pytest.mark.agents(0)
async def test_double_clicks_hidden_rows_and_roles_do_not_surprise(
    farm: Farm, browser: Any, sample_blend: Path
) -> None:
    """Found by a new user's attack: a double click made two jobs, Cancel selected cancelled rows
    the filter hid, a viewer got the Submit form, and an admin saw only their own projects."""
    admin_pw = (farm.settings.data_dir / "secrets" / "initial-admin-password").read_text().strip()
    await farm.client.create_project("shots")  # the admin is not a member
    await user(farm, "vera", "default", role="viewer")
    model = await farm.client.upload_model(sample_blend, project="default")
    first = await farm.client.create_job(model_id=model["id"], frames="1", name="keep-me")
    await farm.client.cancel(first["id"])
    second = await farm.client.create_job(model_id=model["id"], frames="1", name="queued-one")

    viewer = await (await browser.new_context()).new_page()
    await login(viewer, farm.url, "vera")
    await viewer.locator("#jobs tbody tr").first.wait_for()
    assert await viewer.get_by_role("checkbox").count() == 0  # nothing a viewer may cancel
    assert not await viewer.get_by_role("button", name="Cancel selected").is_visible()
    await viewer.goto(farm.url + "/#/submit")
    await viewer.get_by_text("Your roles do not allow submitting jobs").wait_for()

    page = await (await browser.new_context()).new_page()
    page.on("dialog", lambda d: asyncio.ensure_future(d.accept()))
    await login(page, farm.url, "admin", admin_pw)
    # select the queued job, then hide it with the filter: Cancel selected leaves it alone
    await page.get_by_role("checkbox", name="select queued-one").check()
    await page.get_by_label("State").select_option("canceled")
    await page.locator("#jobs caption", has_text="1 of 2 jobs").wait_for()
    assert not await page.get_by_role("button", name="Cancel selected").is_visible()
    assert (await farm.client.job(second["id"]))["state"] == "queued"

    # the admin submits to a project they are not a member of; a double click makes one job
    await page.get_by_role("link", name="Submit").click()
    await page.get_by_label("Project").select_option("shots")
    await page.get_by_label(".blend or .zip").set_input_files(str(sample_blend))
    await page.get_by_role("button", name="Upload").dblclick()
    await page.get_by_role("button", name="Submit job").wait_for()
    await page.get_by_label("Frames", exact=True).fill("1")
    await page.get_by_role("button", name="Submit job").dblclick()
    await page.locator("h1 .state-queued").wait_for()
    jobs = (await farm.client._json("GET", "/api/jobs"))["jobs"]
    assert len(jobs) == 3, [j["name"] for j in jobs]
    uploads = (await farm.client._json("GET", "/api/audit?action=models.upload_model"))["entries"]
    assert len(uploads) == 2, uploads  # ours and the UI's one: the double click sent a single upload
    await page.get_by_role("link", name="Jobs").click()
    await page.locator("#jobs tbody tr", has_text="shots").first.wait_for()  # its name, not its id


@pytest.mark.agents(0)
async def test_tabs_opened_together_without_web_locks_stay_logged_in(farm: Farm, browser: Any) -> None:
    """Over plain http on a LAN name (not a secure context) browsers have no Web Locks; tabs
    opened at once would present the same refresh cookie together, which the server takes for a
    stolen token and ends the login. The page falls back to a lease in localStorage."""
    await user(farm, "tess", "default")
    context = await browser.new_context()
    await context.add_init_script("delete Navigator.prototype.locks;")
    first = await context.new_page()
    await login(first, farm.url, "tess")
    assert await first.evaluate("navigator.locks === undefined")
    pages = [await context.new_page() for _ in range(4)]
    await asyncio.gather(*(p.goto(farm.url + "/#/jobs") for p in pages))
    for p in pages:
        await p.get_by_role("heading", name="Jobs").wait_for()
    reuse = (await farm.client._json("GET", "/api/audit?action=auth.refresh_reuse"))["entries"]
    assert reuse == [], reuse
    await first.reload()
    await first.get_by_role("heading", name="Jobs").wait_for()
    await context.close()
