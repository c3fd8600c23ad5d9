"""The UI story in a real browser (Debian's chromium through selenium): re-run the masks stage from its deployment's
Custom run form, watch it complete, open its masks-summary artifact. A screenshot of each step lands in tmp_path."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from test_server import REPO, sunlearn_serve

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def chromium() -> None:
    setup = subprocess.run(["bash", str(REPO / ".ci" / "system-deps"), "chromium", "chromium-driver"],
                           capture_output=True, text=True, timeout=900)
    if setup.returncode != 0 or not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.skip(f"chromium cannot be installed here: {(setup.stderr or setup.stdout).strip()[-200:]}")


@pytest.fixture
def browser(chromium, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1000",
                f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log")),
                              options=options)
    driver.implicitly_wait(20)
    yield driver
    driver.quit()


def _until(check: Callable[[], object], timeout: float, what: str, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _click(browser, xpath: str, timeout: float = 30) -> None:
    """Click the element at `xpath`, finding it again when the UI re-rendered it between the find and the click."""
    from selenium.common.exceptions import StaleElementReferenceException

    def attempt() -> bool:
        try:
            browser.find_element("xpath", xpath).click()
        except StaleElementReferenceException:
            return False
        return True

    _until(attempt, timeout, f"a clickable {xpath}", every=0.5)


def _by_text(text: str) -> str:
    """XPath of the innermost element whose text is `text`."""
    return f"//*[normalize-space()='{text}' and not(*[normalize-space()='{text}'])]"


@pytest.mark.timeout(900)
def test_rerun_the_masks_stage_from_the_ui_form(tmp_path, browser):
    from selenium.webdriver.common.by import By

    shots = tmp_path / "screenshots"
    shots.mkdir()
    steps: list[str] = []

    def shot(name: str) -> None:
        steps.append(name)
        assert browser.save_screenshot(str(shots / f"{len(steps):02d}-{name}.png"))

    artifacts = tmp_path / "artifacts"
    with sunlearn_serve(tmp_path, artifacts) as (ui_url, _, _):
        browser.get(ui_url)
        _until(lambda: browser.find_elements(By.XPATH, _by_text("Deployments")), 60, "the UI's navigation")
        shot("ui")
        _click(browser, "//a[normalize-space()='Deployments']")
        _click(browser, "//a[normalize-space()='masks']")
        _until(lambda: "/deployments/deployment/" in browser.current_url, 30, "the masks deployment page")
        shot("masks-deployment")

        _click(browser, "//button[normalize-space()='Run']")
        _click(browser, _by_text("Custom run"))
        _until(lambda: "/run" in browser.current_url, 30, "the custom run form")
        fields = _until(lambda: browser.find_elements(By.TAG_NAME, "textarea"), 30, "the parameter fields")
        assert [f.get_attribute("value") for f in fields][:2] == ["masks", "embedded"]
        fields[1].clear()
        fields[1].send_keys("micro")
        _click(browser, "//button[normalize-space()='Add item']")
        fields = _until(lambda: [f for f in browser.find_elements(By.TAG_NAME, "textarea")
                                 if f.get_attribute("value") == ""], 30, "the new overrides item")
        fields[0].send_keys("masks.gamma=0.3")
        shot("custom-run-form")
        _click(browser, "//button[normalize-space()='Submit']")
        _until(lambda: browser.find_elements(By.XPATH, "//a[contains(@href, '/runs/flow-run/')]"), 60,
               "the new flow run in the deployment's runs")
        _click(browser, "//a[contains(@href, '/runs/flow-run/')]")
        _until(lambda: "/runs/flow-run/" in browser.current_url, 30, "the flow run page")
        shot("flow-run")

        def final_state() -> str:
            # the UI's default (V2, which the root opens) marks a state badge with its state's colour class
            badges = browser.find_elements(By.XPATH, "//span[@data-slot='badge' and contains(@class, 'bg-state-')]")
            if badges and badges[0].text in {"Completed", "Failed", "Crashed", "Cancelled"}:
                return badges[0].text
            browser.refresh()
            return ""

        state = _until(final_state, 600, "the flow run to finish", every=5)
        shot("flow-run-finished")
        assert state == "Completed"

        _click(browser, _by_text("Artifacts"))
        card = "//a[contains(@href, '/artifacts/') and .//*[normalize-space()='masks-summary']]"
        _until(lambda: browser.find_elements(By.XPATH, card), 60, "the masks-summary artifact card")
        _click(browser, card)
        page = _until(lambda: (t := browser.find_element(By.TAG_NAME, "body").text) and "fingerprint" in t and t,
                      60, "the artifact's markdown")
        shot("masks-summary")

    manifests = [json.loads(p.read_text()) for p in artifacts.glob("masks/*/manifest.json")]
    assert [m["config"]["masks"]["gamma"] for m in manifests] == [0.3]
    assert manifests[0]["fingerprint"] in page and "masks (ran)" in page
    assert sorted(p.name for p in shots.iterdir()) == [f"{i:02d}-{n}.png" for i, n in enumerate(steps, 1)]
    assert all(Path(p).stat().st_size > 10_000 for p in shots.iterdir())
