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


ROOT = os.path.join(os.path.dirname(__file__), "..")
PAGES = ["README.md", "docs/reference.md", "docs/architecture.md", "benchmarks/README.md", "benchmarks/HISTORY.md",
         "benchmarks/results/README.md", "benchmarks/results/archive/README.md"]


def test_benchmark_tables_match_their_raw_files():
    import sys
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import tables
    assert tables.main(["--check"]) == 0, "regenerate: python benchmarks/tables.py"


def test_a_table_names_the_switches_its_run_set():
    """A results file's KTCLI_* switches (machine.ktcli_env) show in its table's provenance line; none: nothing."""
    import sys
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import tables
    d = {"command": "ktcli bench p.yaml", "machine": {"gpu": "G", "cpu": "C", "torch": "2", "git_commit": "abc"}}
    assert tables.provenance(d) == "`ktcli bench p.yaml` — G + C, torch 2, commit abc"
    d["machine"]["ktcli_env"] = {"KTCLI_PREFILL_WAYS": "routed,split", "KTCLI_SPLIT_JOIN": "host"}
    assert tables.provenance(d).endswith(", with `KTCLI_PREFILL_WAYS=routed,split KTCLI_SPLIT_JOIN=host`")


def test_links_between_pages_resolve():
    """Every relative link in the docs points at a file (or folder) that exists; a renamed folder breaks this."""
    import re
    bad = []
    for page in PAGES:
        text = open(os.path.join(ROOT, page), encoding="utf-8").read()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target:
                continue
            if not os.path.exists(os.path.join(ROOT, os.path.dirname(page), target)):
                bad.append(f"{page} → {target}")
    assert not bad, bad


def test_paths_named_in_the_docs_exist():
    """Code paths named in backticks (`ktcli/…`, `benchmarks/…`) exist: docs follow the code's folders."""
    import re
    bad = []
    for page in PAGES:
        text = open(os.path.join(ROOT, page), encoding="utf-8").read()
        for path in re.findall(r"`((?:ktcli|benchmarks|tests|profiles)/[\w./-]*)`", text):
            if not glob_exists(os.path.join(ROOT, path)):
                bad.append(f"{page}: {path}")
    assert not bad, bad


def glob_exists(path):
    import glob
    return bool(glob.glob(path.split(" ")[0]))
