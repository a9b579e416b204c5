"""docs/reference.md is generated from the code; this fails when it drifts."""
import os

from ktcli.report.docs import reference

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "reference.md")


def test_reference_is_current():
    with open(DOC, encoding="utf-8") as f:
        assert f.read() == reference(), "regenerate: python -m ktcli.report.docs > docs/reference.md"


def test_every_operator_and_field_is_documented():
    from ktcli.ops.registry import OPERATORS
    from ktcli.profile.schema import FIELDS, KWARG_FIELDS, RUNTIME_FIELDS
    text = reference()
    for name in [*OPERATORS, *FIELDS, *RUNTIME_FIELDS, *KWARG_FIELDS]:
        assert f"`{name}`" in text
