"""Base of every config section: unknown keys are errors, assignments are validated, floats finite."""

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    # allow_inf_nan=False: `lr: .inf` or `weight_decay: .nan` parse as floats and pass `gt=0`, then
    # train to NaN; no setting of ours means anything at infinity.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
