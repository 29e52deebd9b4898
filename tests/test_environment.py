"""The package's environment variables are read in one place (`fisedit_compiler.environment`), once, and again on
`reread()`."""

from __future__ import annotations

from pathlib import Path

import torch

from fisedit_compiler import cost_model, dump, environment, kernels
from fisedit_compiler.policy import Policy


def test_read_takes_any_mapping_and_has_the_defaults():
    assert environment.read({}) == environment.Environment(cache_dir=Path.home() / ".cache" / "fisedit")
    env = environment.read({"FISEDIT_KERNELS": "reference", "FISEDIT_DUMP_DIR": "d", "FISEDIT_DUMP_SVG": "0",
                            "FISEDIT_CACHE_DIR": "/c", "OMP_WAIT_POLICY": "PASSIVE"})
    assert env == environment.Environment(kernels="reference", dump_dir="d", dump_svg=False, cache_dir=Path("/c"),
                                          omp_wait_policy="PASSIVE")
    assert environment.read({"FISEDIT_DUMP_DIR": "", "FISEDIT_CACHE_DIR": ""}) == environment.read({})  # empty: unset


def test_a_variable_set_later_counts_only_after_reread(monkeypatch, tmp_path):
    before = environment.current()
    monkeypatch.setenv("FISEDIT_KERNELS", "reference")
    monkeypatch.setenv("FISEDIT_DUMP_DIR", str(tmp_path / "dumps"))
    monkeypatch.setenv("FISEDIT_CACHE_DIR", str(tmp_path))
    assert environment.current() is before  # read once: setting a variable changes nothing by itself
    assert environment.reread() is environment.current() != before
    assert environment.current().kernels == "reference"
    assert kernels.select_backend([torch.zeros(2)]) == "reference"
    assert dump.dump_root(Policy()) == tmp_path / "dumps"
    assert dump.dump_root(Policy(dump_dir="mine")) == Path("mine")  # the policy's folder first
    assert cost_model.calibration_path(torch.device("cpu")).parent == tmp_path


def test_only_the_environment_module_reads_the_environment():
    package = Path(environment.__file__).parent
    readers = sorted(str(path.relative_to(package)) for path in package.rglob("*.py")
                     if any(word in path.read_text() for word in ("os.environ", "getenv(")))
    assert readers == ["environment.py"]


def test_nothing_the_test_before_set_carries_over():
    """tests/conftest.py re-reads after every test, after monkeypatch restored the variables (runs after the test
    above, which set three)."""
    assert environment.current() == environment.read()
