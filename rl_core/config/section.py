"""The base of every config section: unknown keys are refused and assignments are validated."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section: extra keys raise pydantic's ValidationError naming them; assignment is validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
