"""With ``CI`` set, a skipped test fails the run: a missing driver, service, browser or data set
must turn CI red, not quietly stop the test from guarding anything. Outside CI it still skips."""
from __future__ import annotations

import pytest

from conftest import TESTS

SKIPPING = '''
import pytest

def test_needs_a_service():
    pytest.skip("INFANTINO_TEST_PG_URL not set (.ci/pg.sh)")

@pytest.mark.skipif(True, reason="chromedriver not installed")
def test_needs_a_browser():
    pass

@pytest.mark.xfail(reason="a known bug is not an environment skip", strict=True)
def test_known_bug():
    assert False

def test_fine():
    pass
'''

MISSING_IMPORT = '''
import pytest

pytest.importorskip("no_such_driver_for_this_test")

def test_never_collected():
    pass
'''


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest((TESTS / "conftest.py").read_text())
    return pytester


@pytest.mark.parametrize("value, ci", [("true", True), ("1", True), ("yes", True), ("", False), ("false", False), ("0", False)])
def test_what_counts_as_ci(monkeypatch, value, ci):
    from conftest import _in_ci

    monkeypatch.setenv("CI", value)
    assert _in_ci() is ci


def test_in_ci_a_skip_is_a_failure_that_says_why(project, monkeypatch):
    project.makepyfile(test_skipping=SKIPPING)
    monkeypatch.setenv("CI", "true")
    result = project.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1, errors=1, xfailed=1)  # the skipif fails in setup: an error
    result.stdout.fnmatch_lines(["*skipped in CI, which must provide what it needs: INFANTINO_TEST_PG_URL not set*",
                                 "*skipped in CI*chromedriver not installed*"])


def test_in_ci_a_module_skipped_at_import_fails_collection(project, monkeypatch):
    project.makepyfile(test_missing=MISSING_IMPORT)
    monkeypatch.setenv("CI", "true")
    result = project.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*skipped in CI*could not import 'no_such_driver_for_this_test'*"])
    assert result.ret != 0


@pytest.mark.parametrize("ci", [None, "false"])
def test_outside_ci_skips_stay_skips(project, monkeypatch, ci):
    project.makepyfile(test_skipping=SKIPPING, test_missing=MISSING_IMPORT)
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    result = project.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=3, xfailed=1)
    assert result.ret == 0
