"""
The HTML console in headless Chromium, against two real nodes that mirror
each other: the cluster view, create, edit, a 412 conflict (reload and
overwrite), delete, deep links, the per-collection prefix filter and a
420 px wide window.

Needs Debian's ``chromium`` and ``chromium-driver`` and Selenium from PyPI
(.ci/run installs them); skipped elsewhere, failed under CI when missing.
The browser is driven from a thread (Selenium blocks), so the reactor goes
on serving the nodes' output.
"""

import json
import os
import shutil
import urllib.error
import urllib.request

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from tests.harness import NodeTestMixin, deferred_test

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")


def _missing():
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed"
    if CHROMIUM is None or CHROMEDRIVER is None:
        return "chromium and chromium-driver are not installed"
    return None


def http(method, url, body=None, headers=()):
    """(status, parsed JSON) of a blocking request (run in a thread)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers))
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


class ConsoleBrowserTests(NodeTestMixin, TestCase):
    timeout = 180

    def setUp(self):
        missing = _missing()
        if missing:
            if os.environ.get("CI"):
                self.fail(missing + ": .ci/run installs them")
            raise SkipTest(missing)

    def browser(self):
        from selenium import webdriver

        os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager: never download anything
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in (
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--disable-background-networking", "--disable-component-update", "--disable-default-apps",
            "--disable-extensions", "--disable-sync", "--no-first-run", "--metrics-recording-only",
            "--user-data-dir=" + os.path.abspath(self.mktemp()), "--window-size=420,900",
        ):
            options.add_argument(arg)
        return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))

    @deferred_test
    async def test_console(self):
        a, b = await self.start_cluster(2, args=["--processes", "lang"])
        await deferToThread(self.drive, a, b)

    def drive(self, a, b):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys
        from selenium.webdriver.support import expected_conditions as EC
        from selenium.webdriver.support.ui import WebDriverWait

        driver = self.browser()
        try:
            wait = WebDriverWait(driver, 20)
            find = lambda id: driver.find_element(By.ID, id)  # noqa: E731

            def text_in(id, text):
                wait.until(EC.text_to_be_present_in_element((By.ID, id), text))

            # The cluster view: this node, and its peer up.
            driver.get(a.url + "/#/books")
            text_in("self", "this node")
            text_in("peers", b.url)
            text_in("peers", "up")

            # Create.
            find("uid").send_keys("dune")
            find("value").clear()
            find("value").send_keys('"A desert planet"')
            find("create").click()
            text_in("message", "created dune")
            wait.until(lambda d: d.execute_script("return location.hash") == "#/books/dune")
            text_in("records", "A desert planet")
            status, first = http("GET", a.url + "/books/dune")
            self.assertEqual((status, first["value"]), (200, "A desert planet"))
            text_in("records", first["version"])

            # Edit (sent with If-Match of the version read).
            find("value").clear()
            find("value").send_keys('"Dune, by Frank Herbert"')
            find("save").click()
            text_in("message", "saved dune")
            status, edited = http("GET", a.url + "/books/dune")
            self.assertEqual(edited["value"], "Dune, by Frank Herbert")

            # A conflict: someone else writes (on B) after the console read.
            status, other = http("PUT", b.url + "/books/dune", {"value": "changed elsewhere"})
            self.assertEqual(status, 200)
            wait.until(lambda d: http("GET", a.url + "/books/dune?local=1")[1].get("version") == other["version"])
            find("value").clear()
            find("value").send_keys('"my edit"')
            find("save").click()
            wait.until(EC.visibility_of_element_located((By.ID, "conflict")))
            text_in("conflictversion", other["version"])
            text_in("conflictvalue", "changed elsewhere")
            find("reload").click()
            self.assertEqual(json.loads(find("value").get_attribute("value")), "changed elsewhere")
            self.assertFalse(find("conflict").is_displayed())
            # ... again, and this time overwrite it.
            http("PUT", a.url + "/books/dune", {"value": "changed again"})
            find("value").clear()
            find("value").send_keys('"my edit"')
            find("save").click()
            wait.until(EC.visibility_of_element_located((By.ID, "conflict")))
            find("overwrite").click()
            text_in("message", "saved dune")
            self.assertEqual(http("GET", a.url + "/books/dune")[1]["value"], "my edit")

            # A deep link, in a fresh page, opens the record.
            http("POST", a.url + "/books/dune2", {"value": "Dune Messiah"})
            driver.get(a.url + "/#/books/dune2")
            wait.until(lambda d: find("uid").get_attribute("value") == "dune2")
            self.assertEqual(json.loads(find("value").get_attribute("value")), "Dune Messiah")

            # Keyboard: the records are links; Enter on one opens it.
            link = driver.find_element(By.CSS_SELECTOR, '#records a[href="#/books/dune"]')
            link.send_keys(Keys.ENTER)
            wait.until(lambda d: find("uid").get_attribute("value") == "dune")

            # Delete (confirmed), then the record is gone on both nodes.
            find("delete").click()
            wait.until(EC.alert_is_present())
            driver.switch_to.alert.accept()
            text_in("message", "deleted dune")
            self.assertEqual(http("GET", a.url + "/books/dune")[0], 404)
            wait.until(lambda d: http("GET", b.url + "/books/dune?local=1")[0] == 404)

            # Delete with no uid sends nothing and says why.
            find("clear").click()
            find("delete").click()
            text_in("message", "give the uid")

            # The prefix filter belongs to its collection and is shown.
            http("POST", a.url + "/films/alien", {"value": "x"})
            find("prefix").send_keys("dune2" + Keys.ENTER)
            wait.until(EC.visibility_of_element_located((By.ID, "filter")))
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#records tr")) == 1)
            driver.execute_script("location.hash = '#/films'")
            text_in("title", "films")
            self.assertEqual(find("prefix").get_attribute("value"), "")
            self.assertFalse(find("filter").is_displayed())
            text_in("records", "alien")
            driver.execute_script("location.hash = '#/books'")
            text_in("title", "books")
            self.assertEqual(find("prefix").get_attribute("value"), "dune2")

            # 420 px wide: nothing wider than the window.
            width, inner = driver.execute_script(
                "return [document.documentElement.scrollWidth, window.innerWidth]")
            self.assertLessEqual(width, inner)
        finally:
            driver.quit()
