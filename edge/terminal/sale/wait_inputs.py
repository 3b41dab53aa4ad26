"""What the POS app may answer to each WAIT of the terminal's workflows: one strict model
per step, named by the step's ``input_schema:``.

Strict, ``extra="forbid"`` and ``hide_input_in_errors``: an answer carries exactly the
fields its step declares, and a refusal names the field, never the value (the local API
also refuses anything shaped like card data before it gets here). Whatever a model
accepts is merged into the run's state, so a field added here is a field stored.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["PaperLoaded", "WaitInput"]


class WaitInput(BaseModel):
    """The base of every WAIT step's input model."""

    # defer_build: built by the first answer to a WAIT, not when the daemon starts.
    model_config = ConfigDict(
        extra="forbid", strict=True, frozen=True, hide_input_in_errors=True, defer_build=True
    )


class PaperLoaded(WaitInput):
    """``await_paper`` (payment, refund): the printer has paper again; print the receipt.
    Nothing to say but that: the answer is ``{}``."""
