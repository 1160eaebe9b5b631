"""The Prefect cards a person reads: pictures without printed data URLs, whole-number axes, series that stay
apart, and the run's story on the flow run rather than on one of its task runs."""

from __future__ import annotations

import base64

import matplotlib

matplotlib.use("Agg")
from matplotlib.ticker import MaxNLocator  # noqa: E402

from tasks.cards import markdown_image, png_data_url  # noqa: E402
from tasks.curves import STYLES, _figure, curves_artifact_key, curves_markdown, series_label  # noqa: E402

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def test_a_series_that_is_zero_everywhere_says_so_in_the_legend():
    assert series_label("context_overflow", [0.0, 0.0, 0.0]) == "context_overflow (all zero)"
    assert series_label("token_cap", [0.0, 0.01]) == "token_cap"
    assert series_label("max_turns", []) == "max_turns"  # nothing drawn: nothing to claim
    assert len(set(STYLES)) == len(STYLES)  # each series its own marker and line style


def test_iteration_axes_tick_only_at_whole_numbers():
    figure, axes = _figure("t", "iteration", "y")
    axes.plot([1, 2], [0.1, 0.2])
    figure.canvas.draw()
    ticks = [t for t in axes.get_xticks() if 1 <= t <= 2]
    assert isinstance(axes.xaxis.get_major_locator(), MaxNLocator)
    assert ticks == [1.0, 2.0]  # not 1.25, 1.5, 1.75


def test_the_curves_card_shows_each_picture_inline_under_its_title(tmp_path):
    paths = []
    for name in ("reward", "pass_at_1", "truncation"):
        path = tmp_path / f"{name}.png"
        path.write_bytes(PNG)
        paths.append(path)
    text = curves_markdown("Run_1", paths)
    assert text.startswith("# Curves of `Run_1`")
    assert text.count("](data:image/png;base64,") == 3
    assert "![Training reward](data:image/png;base64," in text and "![Truncated episodes](" in text
    assert markdown_image(paths[0], "alt") == f"![alt]({png_data_url(paths[0])})"
    assert png_data_url(paths[0]) == "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert curves_artifact_key("Run_1") == "curves-run-1"


def test_a_flow_run_card_made_inside_a_task_belongs_to_the_flow_run(prefect_harness):
    from prefect import flow, task
    from prefect.artifacts import Artifact, create_markdown_artifact
    from prefect.runtime import flow_run

    from tasks.cards import publish_flow_run_card

    @task
    def make_cards() -> None:
        publish_flow_run_card("# story", key="card-on-the-flow-run", description="the run's story")
        create_markdown_artifact("# detail", key="card-on-the-task-run")

    @flow
    def story() -> str:
        make_cards()
        return str(flow_run.id)

    flow_run_id = story()
    on_flow = Artifact.get("card-on-the-flow-run")
    assert on_flow is not None and on_flow.type == "markdown" and on_flow.data == "# story"
    assert str(on_flow.flow_run_id) == flow_run_id and on_flow.task_run_id is None
    assert on_flow.description == "the run's story"
    on_task = Artifact.get("card-on-the-task-run")  # what Prefect does by default, for comparison
    assert str(on_task.flow_run_id) == flow_run_id and on_task.task_run_id is not None
