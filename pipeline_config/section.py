"""The base of every config section: unknown keys are rejected, assignments validated, and `inf` or `nan` in any
number field is an input error, not a run that diverges."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
