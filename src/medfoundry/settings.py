"""The base of every typed settings class, kept apart so components can declare their settings beside themselves
without importing ``medfoundry.config`` (which imports them to compose a recipe)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Unknown keys are errors and assignments are validated, so a typo never falls back to a default silently."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
