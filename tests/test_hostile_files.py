"""R1: every case of the hostile-file corpus (tests/hostile_corpus.py) ends in a typed error, in bounded memory."""

from __future__ import annotations

import hostile_corpus
import pytest


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return hostile_corpus.run_fresh(tmp_path_factory.mktemp("hostile"))


@pytest.mark.slow
def test_the_corpus_has_at_least_60_cases(report):
    assert len(report["results"]) >= 60
    assert len({r["case"] for r in report["results"]}) == len(report["results"])


@pytest.mark.slow
def test_every_hostile_file_gets_a_typed_error(report):
    bad = [(r["case"], r["outcome"], r["error"]) for r in report["results"]
           if r["outcome"] == "accepted" or r["outcome"].startswith("untyped")]
    assert bad == []


@pytest.mark.slow
def test_no_hostile_file_leaves_output_behind(report):
    assert [r["case"] for r in report["results"] if r["wrote_output"]] == []


@pytest.mark.slow
def test_errors_are_one_line(report):
    for r in report["results"]:
        assert r["error"] and "\n" not in r["error"], r["case"]


@pytest.mark.slow
def test_memory_and_time_stay_bounded(report):
    growth = report["rss_peak"] - report["rss_before"]
    assert growth <= report["max_input"] + (64 << 20), f"peak RSS grew {growth >> 20} MiB"
    slow = [(r["case"], round(r["seconds"], 2)) for r in report["results"] if r["seconds"] > 1.0]
    assert slow == []
