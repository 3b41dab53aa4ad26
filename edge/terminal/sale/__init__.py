"""The sale domain: payment, refund, void and settlement steps, risk limits, the fraud
policy, and the workflows (YAML) that put the steps in order."""

from pathlib import Path

#: The terminal's workflow definitions (``payment.yaml``, ``refund.yaml``, …), shipped as
#: package data (and as data files in the frozen binary).
WORKFLOWS = Path(__file__).with_name("workflows")
