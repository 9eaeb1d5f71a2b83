"""The HTML report in a real headless Chromium: no console error, plots, sorting, searching.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them) and selenium
(the dev extra); selenium is pointed at those binaries, so nothing is downloaded.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_report_html import EVIL, _png, probe_reports, synthetic_audit

from memaudit.render.html import render_html, write_html

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed (dev extra)"
)

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="headless Chromium not installed: apt-get install chromium chromium-driver",
)


@pytest.fixture()
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not fetch anything
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-sync",
        "--window-size=1280,1600",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(DRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _column(driver: Any, name: str) -> list[str]:
    return driver.execute_script(
        """
        const table = document.getElementById('examples-table');
        const cells = [...table.tHead.rows[0].cells];
        const i = cells.findIndex(c => c.textContent.trim() === arguments[0]);
        return [...table.tBodies[0].rows].filter(r => !r.hidden).map(r => r.cells[i].textContent);
        """,
        name,
    )


def _numbers(values: list[str]) -> list[float]:
    return [float(v) for v in values if v.strip()]


def test_report_in_headless_chromium(browser: Any, tmp_path: Path) -> None:
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    report = synthetic_audit(60, class_names=[EVIL, *(f"digit {i}" for i in range(1, 10))])
    thumbs = {x.id: _png(x.id) for x in report.scan.examples}
    page = write_html(tmp_path / "audit.html", report, *probe_reports(), images=thumbs)
    browser.get(page.resolve().as_uri())

    # No console error: a blocked network load (CSP), a script error or a missing resource
    # would all show here.
    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert not errors, errors
    # The class name "<script>alert(1)</script>" is text on the page, and it never ran.
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert  # noqa: B018  (property access raises when no alert is open)
    assert EVIL in browser.find_element(By.ID, "examples-table").text

    # Plots are present and laid out.
    sizes = browser.execute_script(
        "return [...document.querySelectorAll('figure.plot svg')]"
        ".map(s => s.getBoundingClientRect().width * s.getBoundingClientRect().height)"
    )
    assert len(sizes) >= 9 and all(s > 10_000 for s in sizes)  # 4 audit plots + 5 probe plots
    thumbs_shown = browser.execute_script(
        "return [...document.querySelectorAll('img.thumb')].filter(i => i.naturalWidth > 0).length"
    )
    assert thumbs_shown == 60

    # Sorting: click "units" twice (ascending, then descending); empty cells stay last.
    header = browser.find_element(By.XPATH, "//table[@id='examples-table']//th[text()='units']")
    header.click()
    values = _column(browser, "units")
    assert _numbers(values) == sorted(_numbers(values))
    assert "" in values and values[-1] == ""  # not-flipped rows have no count: sorted last
    header.click()
    assert _numbers(_column(browser, "units")) == sorted(_numbers(values), reverse=True)
    assert header.get_attribute("aria-sort") == "descending"

    # Searching filters the rows and updates the count.
    search = browser.find_element(By.CSS_SELECTOR, "input.search")
    search.send_keys("budget exhausted")
    statuses = _column(browser, "status")
    expected = sum(x.status.value == "budget_exhausted" for x in report.scan.examples)
    assert len(statuses) == expected and all(s == "budget exhausted" for s in statuses)
    count = browser.find_element(By.CSS_SELECTOR, ".count").text
    assert count == f"{expected} of 60"
    search.clear()
    search.send_keys(" ")  # an input event with an empty query shows every row again
    assert len(_column(browser, "status")) == 60

    browser.set_window_size(1280, 7000)
    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    assert not [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


def test_csp_blocks_network_loads_and_injected_scripts(browser: Any, tmp_path: Path) -> None:
    """Defense in depth: even markup that slipped past escaping could neither load nor run."""
    page = render_html(synthetic_audit(5)).replace(
        '<main class="memaudit">',
        '<main class="memaudit"><img src="https://example.com/x.png">'
        "<script>document.title = 'injected'</script>",
    )
    path = tmp_path / "tampered.html"
    path.write_text(page)
    browser.get(path.as_uri())
    errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert any("img-src" in m for m in errors) and any("script-src" in m for m in errors)
    assert browser.title != "injected"
    # memaudit's own script still ran (hash-pinned): the table sorts.
    assert (
        browser.execute_script(
            "return document.querySelector('.memaudit').getAttribute('data-ready')"
        )
        == "1"
    )
