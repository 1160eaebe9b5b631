"""Prefect artifact cards a person reads: where they are attached, and pictures without printed data URLs.

Prefect attaches an artifact to the task run it is created in, so a card made inside a task shows
under "Task runs" on the flow run's Artifacts tab and the "Flow run" section stays "None". The
cards that tell a run's story (the gate decision, the curves, the doctor's findings) are made with
`publish_flow_run_card`, which attaches them to the flow run itself, wherever it is called from.

Pictures go in markdown cards (`markdown_image`): an image artifact prints its whole URL (a PNG
inlined as a data URL is tens of thousands of characters) above the picture, while a markdown card
shows only the picture. The PNG is inlined so the UI shows it without a file server.
"""

from __future__ import annotations

import base64
from pathlib import Path
from uuid import UUID

from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import ArtifactCreate
from prefect.utilities.context import get_task_and_flow_run_ids


def png_data_url(path: str | Path) -> str:
    """The PNG file at `path` as a `data:image/png;base64,...` URL (about 4/3 of the file's size)."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def markdown_image(path: str | Path, alt: str) -> str:
    """A markdown image of the PNG at `path`, inlined as a data URL; `alt` is the text shown without it."""
    return f"![{alt}]({png_data_url(path)})"


def publish_flow_run_card(markdown: str, key: str, description: str) -> UUID:
    """Publish a markdown artifact on the current flow run (not on the task run it is created in).

    `key`: lowercase letters, digits and dashes (Prefect refuses others with a ValueError).
    Inside a flow or task run the card is attached to the flow run only, so the flow run's
    Artifacts tab lists it under "Flow run"; outside any run it is created like
    `create_markdown_artifact` does. Returns the artifact's id."""
    _, flow_run_id = get_task_and_flow_run_ids()
    if flow_run_id is None:
        return create_markdown_artifact(markdown=markdown, key=key, description=description)
    with get_client(sync_client=True) as client:
        artifact = client.create_artifact(
            artifact=ArtifactCreate(
                type="markdown",
                key=key,
                description=description,
                data=markdown,
                flow_run_id=flow_run_id,
                task_run_id=None,
            )
        )
    return artifact.id
