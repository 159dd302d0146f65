"""One version lookup for every result: the module that ran, else the distribution, else unknown."""

from __future__ import annotations

import sys
import types

import numpy as np

from sensitivity.run import versions as sensitivity_versions
from sensitivity.versions import UNKNOWN, version_of, versions


def test_an_imported_module_reports_the_version_that_ran(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "fake_lib", types.SimpleNamespace(__version__="9.9"))
    assert version_of("fake_lib") == "9.9"
    assert version_of("numpy") == np.__version__


def test_a_distribution_not_imported_is_read_from_its_metadata_and_an_absent_one_is_unknown() -> None:
    assert version_of("mpq") not in ("", UNKNOWN)  # installed (editable): there is no module named mpq
    assert version_of("no-such-package-anywhere") == UNKNOWN
    assert versions("mpq", "no-such-package-anywhere")["no-such-package-anywhere"] == UNKNOWN


def test_results_record_the_same_names_through_the_one_lookup() -> None:
    assert set(sensitivity_versions()) == {"mpq", "torch", "onnx", "onnxruntime"}
    assert UNKNOWN not in sensitivity_versions().values()
