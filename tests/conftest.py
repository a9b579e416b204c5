import os
import re

import pytest
from typer.testing import CliRunner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROFILES = os.path.join(ROOT, "profiles")
H100 = "--target-devices=cuda:0=80GiB,cpu=125GiB,cores=16"


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    os.environ.setdefault("KTCLI_CACHE", str(tmp_path_factory.mktemp("ktcli-cache")))
    os.environ.setdefault("KTCLI_BW_PROBE_MIB", "256")    # every bench measures its ceiling: keep that quick here


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class Result:
    def __init__(self, r):
        self.exit_code, self.stdout = r.exit_code, _ANSI.sub("", r.stdout)
        self.stderr = _ANSI.sub("", r.stderr)
        self.output = self.stdout + self.stderr
        self.exception = r.exception

    def __repr__(self):
        return f"<exit {self.exit_code}>\n{self.output}"


@pytest.fixture
def cli():
    from ktcli.cli import app

    def run(*args, input=None):
        r = CliRunner().invoke(app, [str(a) for a in args], input=input, env={"COLUMNS": "200", "NO_COLOR": "1"})
        if r.exception and not isinstance(r.exception, SystemExit):
            raise r.exception
        return Result(r)
    return run


def profile(name):
    return os.path.join(PROFILES, name)
