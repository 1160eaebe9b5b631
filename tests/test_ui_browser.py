"""The Prefect and MLflow UIs as a person sees them (issue 15), checked in a real browser.

Playwright drives Debian's Chromium (`/usr/bin/chromium`, installed by apt; no browser download),
headless, 1440 px wide, a fresh browser profile per test. The module starts, each on a free port of
127.0.0.1 and in a process group of its own:

- `turnstile serve` (Prefect's server and UI, Turnstile's deployments served by the Runner) with its
  own PREFECT_HOME; the train deployment starts at the values of a tiny config (`TINY_CONFIG`, 2
  iterations of 8 episodes, written to the test's folder);
- an MLflow UI (`mlflow server --workers 1`) on the run folder's SQLite store;

and runs one `turnstile train` on the tiny config against them. Then, clicking what a person sees:

- MLflow: the address the closing summary prints for the runs view lists the run; the run's Traces
  tab lists its episodes, and one opens with its policy turns and tool calls; the run's Model
  metrics tab, searched for `val/pass_at_1`, shows that chart.
- Prefect: the Runs page, searched for the Turnstile run id, lists the flow run under that name.
- Prefect: the train deployment's Custom run form, with Iterations changed from 2 to 1 and nothing
  else, starts a run that completes with 1 iteration.

Screenshots of the pages visited (1440 x 900, `<n>-<page>.png` in visiting order; the pages of
../shared/ui-review/ under the names they have there) go to $TURNSTILE_UI_SCREENSHOTS when it is set
(e.g. ../shared/ui-review/after), else to the test's temporary folder; the last page of each test is
saved too, so a failure shows where it stopped. Without Chromium the module is skipped with the
command that installs it; under CI (CI set) that is a failure. About 3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from playwright.sync_api import Browser, Page, expect, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
from tenacity import Retrying, retry_if_not_exception_type, stop_after_delay, wait_fixed

from rl_core.config.run import DEFAULT_CONFIG_PATH
from rl_core.paths import REPO_ROOT

pytestmark = pytest.mark.slow

HOST = "127.0.0.1"
RUN_ID = "ui-browser"
TRAIN_FLOW = "turnstile-train"
STARTUP_TIMEOUT_S = 180  # the first start of a Prefect server migrates its database (about 30 s here)
RUN_TIMEOUT_S = 240  # one tiny train run takes about 30 s on 2 cores
UI_TIMEOUT_MS = 30_000  # a page, a search or a chart appearing
expect.set_options(timeout=UI_TIMEOUT_MS)  # Playwright's assertions wait 5 s by default: too short on a busy machine
INSTALL_CHROMIUM = "sudo apt-get install -y chromium"  # (`make chromium` does it as root)

# The shipped quickstart, shrunk: 2 iterations of 8 episodes, an evaluation of 2 held-out tasks a
# domain after each, and a small untrained batch not vetoed by the truncation checks.
TINY_CONFIG = {
    "iterations": 2,
    "rollout": {"group_size": 4, "global_batch_size": 8, "max_turns": 4},
    "evaluation": {"max_tasks": 2, "num_samples": 2, "pass_k": [1, 2], "val_every": 1},
    "validation": {"max_token_cap_frac": 1.0, "max_turns_unanswered_frac": 1.0},
}


def _chromium() -> str:
    """The Chromium executable; skips the module with the install command (fails under CI) when absent."""
    path = shutil.which("chromium")
    if path is None:
        message = f"Chromium is missing: install it with `{INSTALL_CHROMIUM}` (Debian/Ubuntu; `make chromium` as root)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


# --------------------------------------------------------------------------- the servers


class Exited(RuntimeError):
    """A server process ended while we waited for it."""


@dataclass
class Service:
    """A server started by the module: its process (leader of its own process group) and its log."""

    name: str
    process: subprocess.Popen
    log: Path

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def wait_until(self, what: str, probe: Callable[[], object], timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Call `probe` until it returns without raising (tenacity, every 0.5 s); fail the test with this
        server's log when the process exits or `timeout_s` passes first."""

        def attempt() -> None:
            if self.process.poll() is not None:
                raise Exited(f"exit code {self.process.returncode}")
            probe()

        retrying = Retrying(
            stop=stop_after_delay(timeout_s), wait=wait_fixed(0.5), retry=retry_if_not_exception_type(Exited)
        )
        try:
            retrying(attempt)
        except Exception as exc:  # tenacity's RetryError, or Exited
            pytest.fail(f"{self.name}: {what} not reached ({exc!r}); its log ends with:\n{self.tail()}")

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it after 60 s; then end any process it started in another
        session (the Prefect server, which `turnstile serve` stops itself on SIGTERM) within 10 s."""
        started = psutil.Process(self.process.pid).children(recursive=True) if self.process.poll() is None else []
        for sig, wait_s in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        _, left = psutil.wait_procs(started, timeout=10)
        for orphan in left:
            orphan.kill()


def _start(name: str, command: list[str], log: Path, env: dict[str, str]) -> Service:
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Service(name, process, log)


@dataclass
class Stack:
    """The servers, the run folder and the output of the `turnstile train` run the tests look at."""

    root: Path
    runs: Path
    config: Path
    prefect_ui: str
    api_url: str
    mlflow_ui: str
    env: dict[str, str]
    train_deployment: str = ""
    train_output: str = ""
    shots: Path = field(default_factory=Path)
    counter: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def shot(self, page: Page, name: str) -> Path:
        """Save what the page shows now (1440 px wide) as `<n>-<name>.png`, numbered in visiting order; CSS
        transitions are run to their end first (Prefect's pages fade in)."""
        path = self.shots / f"{next(self.counter):02d}-{name}.png"
        page.screenshot(path=path, animations="disabled")
        return path


def _train_deployment(api_url: str) -> str:
    """The name of the served deployment of the train flow that starts runs by hand (not the schedule's)."""
    response = httpx.post(f"{api_url}/deployments/filter", json={"flows": {"name": {"any_": [TRAIN_FLOW]}}})
    response.raise_for_status()
    found = [d for d in response.json() if not d.get("schedules")] or response.json()
    if not found:
        raise LookupError(f"no deployment of {TRAIN_FLOW} yet")
    return found[0]["name"]


def _write_tiny_config(path: Path, runs: Path, mlflow_ui: str) -> None:
    config = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    for key, value in TINY_CONFIG.items():
        if isinstance(value, dict):
            config.setdefault(key, {}).update(value)
        else:
            config[key] = value
    config["storage"] = {**config.get("storage", {}), "run_dir": str(runs)}
    config["tracking"] = {**config.get("tracking", {}), "ui_url": mlflow_ui}  # the links lead to this MLflow UI
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def _serving_file(root: Path, config: Path) -> Path:
    """deployments/prefect.yaml with the train deployments' settings on the tiny config: `turnstile serve`
    fills in every other field from it, so the Custom run form starts at its values."""
    prefect_file = yaml.safe_load((REPO_ROOT / "deployments" / "prefect.yaml").read_text())
    for deployment in prefect_file["deployments"]:
        if deployment["entrypoint"] == "flows/train.py:train_flow":
            deployment["parameters"] = {"settings": {"config_path": str(config)}}
    path = root / "prefect.yaml"
    path.write_text(yaml.safe_dump(prefect_file, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    _chromium()
    root = tmp_path_factory.mktemp("ui")
    runs = root / "runs"
    runs.mkdir()
    prefect_port, mlflow_port = _free_port(), _free_port()
    prefect_ui, mlflow_ui = f"http://{HOST}:{prefect_port}", f"http://{HOST}:{mlflow_port}"
    config = root / "tiny.yaml"
    _write_tiny_config(config, runs, mlflow_ui)
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env.update(
        PREFECT_HOME=str(root / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_RUNNER_POLL_FREQUENCY="1",  # the Runner picks a run from the form up within a second
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",  # no job-runner processes beside the MLflow UI
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
    )
    shots = Path(os.environ.get("TURNSTILE_UI_SCREENSHOTS") or root / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    stack = Stack(root, runs, config, prefect_ui, f"{prefect_ui}/api", mlflow_ui, env, shots=shots)
    services = []
    try:
        services.append(
            _start(
                "turnstile serve",
                [
                    *(sys.executable, "-m", "flows.serve", "--host", HOST, "--port", str(prefect_port)),
                    *("--run-dir", str(runs), "--prefect-file", str(_serving_file(root, config))),
                ],
                root / "serve.log",
                env,
            )
        )
        services.append(
            _start(
                "mlflow server",
                [
                    *(sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(mlflow_port)),
                    *("--workers", "1", "--backend-store-uri", f"sqlite:///{runs / 'mlflow.db'}"),
                ],
                root / "mlflow.log",
                env,
            )
        )
        serve, mlflow_server = services
        mlflow_server.wait_until("GET /health", lambda: httpx.get(f"{mlflow_ui}/health").raise_for_status())
        serve.wait_until("the train deployment served", lambda: _train_deployment(stack.api_url))
        stack.train_deployment = _train_deployment(stack.api_url)

        train = subprocess.run(
            [sys.executable, "-m", "flows.cli", "train", "--config", str(config), "--set", f"storage.run_id={RUN_ID}"],
            cwd=REPO_ROOT,
            env={**env, "PREFECT_API_URL": stack.api_url},
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
        )
        stack.train_output = train.stdout + train.stderr
        (root / "train.log").write_text(stack.train_output)
        assert train.returncode == 0, f"turnstile train failed:\n{stack.train_output[-4000:]}"
        yield stack
    finally:
        for service in reversed(services):
            service.stop()


@pytest.fixture(scope="module")
def browser(stack) -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture()
def page(browser, stack, request) -> Iterator[Page]:
    """A fresh browser profile (no cookies, no local storage: what a new user sees), 1440 x 900."""
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    context.set_default_timeout(UI_TIMEOUT_MS)
    page = context.new_page()
    try:
        yield page
    finally:
        stack.shot(page, f"{request.node.name.removeprefix('test_')[:60]}-last")
        context.close()


# --------------------------------------------------------------------------- MLflow


def _mlflow_run(stack: Stack):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{stack.runs / 'mlflow.db'}")
    [run] = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"attributes.run_name = '{RUN_ID}'",
    )
    return client, run


def _runs_view_url(stack: Stack) -> str:
    """The MLflow runs-view address the closing summary printed."""
    found = re.findall(rf"{re.escape(stack.mlflow_ui)}/#/experiments/\d+/runs(?:\?\S*)?(?=\s|$)", stack.train_output)
    assert found, f"the closing summary prints no MLflow runs view at {stack.mlflow_ui}:\n{stack.train_output[-3000:]}"
    return found[0]


def _open_run(stack: Stack, page: Page) -> None:
    """From the runs view the summary printed, open the run's page by its name.

    MLflow shows a first-visit pop-over ("Detect Issues in Your Traces") that is modal: while it is open
    nothing else on the page can be reached, so the test clicks its "Got it" as a person does."""
    page.goto(_runs_view_url(stack))
    link = page.get_by_role("link", name=RUN_ID, exact=True).first
    expect(link.or_(page.get_by_role("button", name="Got it")).first).to_be_visible()
    _dismiss_guidance(page)
    expect(link).to_be_visible()
    stack.shot(page, "mlflow-runs-view")
    link.click()
    expect(page.get_by_role("tab", name="Model metrics")).to_be_visible()


def _dismiss_guidance(page: Page) -> None:
    """Click MLflow's first-visit pop-over's "Got it" when it is open (MLflow may also close it itself as
    the page changes: then there is nothing to click)."""
    got_it = page.get_by_role("button", name="Got it").first
    try:
        if got_it.is_visible():
            got_it.click(timeout=5_000)
    except PlaywrightTimeoutError:  # closed by MLflow while being clicked
        pass


def test_mlflow_lists_the_runs_episodes_as_traces(stack, page):
    client, run = _mlflow_run(stack)
    traces = client.search_traces(locations=[run.info.experiment_id], run_id=run.info.run_id, max_results=500)
    assert traces, "the run logged no traces"
    trace = traces[0]
    spans = [span.name for span in trace.data.spans]
    logged = len(client.search_traces(locations=[run.info.experiment_id], max_results=1000))
    page.goto(stack.mlflow_ui)  # a new user's first click: the experiment on MLflow's home page
    page.get_by_role("link", name="turnstile", exact=True).first.click()
    # the default (GenAI) view counts the episodes logged as traces, where it said "Traces 0 / No data available"
    expect(page.get_by_text(str(logged), exact=True).first).to_be_visible()
    stack.shot(page, "mlflow-03b-fresh-click-experiment")
    _dismiss_guidance(page)
    _open_run(stack, page)
    stack.shot(page, "mlflow-06-run-overview")
    page.get_by_role("tab", name="Traces").click()
    expect(page.get_by_text(trace.info.trace_id, exact=True)).to_be_visible()
    stack.shot(page, "mlflow-run-traces")
    page.get_by_text(trace.info.trace_id, exact=True).click()
    for name in spans[:4]:  # the episode, its first policy turn, its first tool call...
        expect(page.get_by_text(name, exact=True).first).to_be_visible()
    stack.shot(page, "mlflow-trace")


def test_mlflow_shows_the_val_pass_at_1_chart(stack, page):
    _open_run(stack, page)
    page.get_by_role("tab", name="Model metrics").click()
    page.get_by_placeholder("Search metric charts").fill("val/pass_at_1")
    expect(page.get_by_text(f"{RUN_ID} (val/pass_at_1)", exact=True)).to_be_visible()  # the chart's legend
    stack.shot(page, "mlflow-val-pass-at-1")


# --------------------------------------------------------------------------- Prefect


def test_the_prefect_ui_talks_to_the_server_that_serves_it(stack):
    """The UI asks /ui-settings where the API is; on a port other than 4200 it must not say 4200."""
    assert httpx.get(f"{stack.prefect_ui}/ui-settings").json()["api_url"] == stack.api_url


def test_prefect_finds_the_flow_run_by_its_turnstile_run_id(stack, page):
    page.goto(f"{stack.prefect_ui}/runs")
    search = page.get_by_placeholder("Search by flow run name").filter(visible=True)
    search.fill(RUN_ID)
    expect(page.get_by_role("link", name=RUN_ID, exact=True)).to_be_visible()
    stack.shot(page, "prefect-runs-search")
    page.get_by_role("link", name=RUN_ID, exact=True).click()
    page.wait_for_url("**/runs/flow-run/**")
    expect(page.get_by_role("tablist").get_by_text("Logs", exact=True)).to_be_visible()  # the flow run's page
    expect(page.get_by_text("Completed", exact=True).first).to_be_visible()
    # its log links the MLflow run (and the log has loaded for the screenshot)
    expect(page.get_by_text(re.compile(rf"MLflow run of {re.escape(RUN_ID)}")).first).to_be_visible()
    stack.shot(page, "prefect-flow-run")
    # Prefect's tabs are list items of a tablist, with no tab role
    page.get_by_role("tablist").get_by_text("Artifacts", exact=True).click()
    expect(page.get_by_text(re.compile(r"^Gate decision")).first).to_be_visible()
    stack.shot(page, "prefect-05-artifacts")


def _form_field(page: Page, label: str):
    """The input of a Custom run form field, found by the label a person reads ("Iterations").

    Prefect's form labels are not tied to their inputs (`for` names no element), so the input is the
    one inside the field that carries the label."""
    text = page.locator(".schema-form-property__label").get_by_text(
        re.compile(rf"^{re.escape(label)}( \(Optional\))?$")
    )
    holder = text.locator("xpath=ancestor::*[contains(concat(' ', @class, ' '), ' schema-form-property ')][1]")
    return holder.locator("input, textarea, select").first


def test_a_custom_run_from_the_form_with_one_changed_field_completes(stack, page):
    from rl_core.store import TrajectoryStore

    page.goto(f"{stack.prefect_ui}/deployments")
    expect(page.get_by_role("link", name=stack.train_deployment, exact=True).first).to_be_visible()
    stack.shot(page, "prefect-14-deployments")
    page.get_by_role("link", name=stack.train_deployment, exact=True).first.click()
    stack.shot(page, "prefect-train-deployment")
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_role("link", name="Custom run").click()
    iterations = _form_field(page, "Iterations")
    expect(iterations).to_have_value(str(TINY_CONFIG["iterations"]))  # the served config's value, not empty
    stack.shot(page, "prefect-19-custom-run-form-top")
    iterations.fill("1")
    stack.shot(page, "prefect-custom-run-form")  # the changed field among the others' starting values
    before = set(os.listdir(stack.runs))
    page.get_by_role("button", name="Submit").click()
    # the toast "<name> scheduled to start now" (Prefect's UI shows it twice, stacked: the top one takes the click)
    page.get_by_role("button", name="View run").last.click()
    page.wait_for_url("**/runs/flow-run/**")
    expect(page.get_by_text("Completed", exact=True).first).to_be_visible(timeout=RUN_TIMEOUT_S * 1000)
    stack.shot(page, "prefect-custom-run-completed")
    page.goto(f"{stack.prefect_ui}/runs")
    expect(page.get_by_text("Completed", exact=True).nth(1)).to_be_visible()  # both runs
    stack.shot(page, "prefect-27-runs-after-custom")

    [run_id] = [name for name in set(os.listdir(stack.runs)) - before if (stack.runs / name).is_dir()]
    assert TrajectoryStore(stack.runs).iterations(run_id) == [1]
