"""benchmarks.recommend_serving's report: options, the Markdown table and the plot, from a result of the shape
:func:`benchmarks.recommend_serving.run` returns (the run itself trains, serves and load-tests for minutes)."""

from __future__ import annotations

import pytest

from benchmarks.recommend_serving import markdown, parse_args, plot

MACHINE = {"cpu": "test CPU", "logical_cores": 2, "usable_cores": 2, "platform": "Linux", "device": "cpu",
           "intra_op_threads": 1, "malloc": {"glibc_keeps_freed_memory": True, "arrow_memory_pool": "mimalloc"},
           "versions": {"python": "3.11"}}
RESULT = {
    "settings": {"items": 100_000, "epochs": 2, "eval_users": 100, "k": 10, "candidates": 200,
                 "batch_delays_ms": [5, 1], "locust_batch_delay_ms": 5},
    "build": {
        "two_towers": {"recall@100": 0.2},
        "index": {"protocol": "recall@100 against exact search", "recall_target": 0.95,
                  "chosen": {"name": "ivf316_nprobe16"},
                  "candidates": [{"name": "exact", "recall_at_k": 1.0, "query_ms_median": 2.5},
                                 {"name": "ivf316_nprobe16", "recall_at_k": 0.97, "query_ms_median": 0.3}]},
    },
    "sequential": {
        "served, maxBatchDelay 5 ms": {"requests": 300, "warmup": 50, "p50_ms": 14.0, "p75_ms": 16.0, "p99_ms": 30.0,
                                       "requests_per_s": 66.0},
        "served, maxBatchDelay 1 ms": {"requests": 300, "warmup": 50, "p50_ms": 9.5, "p75_ms": 11.0, "p99_ms": 18.0,
                                       "requests_per_s": 98.0},
        "in process": {"requests": 300, "warmup": 50, "p50_ms": 4.0, "p75_ms": 4.5, "p99_ms": 7.0,
                       "requests_per_s": 240.0},
    },
    "locust": {"steps": [{"users": 2, "requests_per_s": 90.0, "records_per_s": 18000.0, "p50_ms": 20, "p99_ms": 40,
                          "failures": 0},
                         {"users": 4, "requests_per_s": 95.0, "records_per_s": 19000.0, "p50_ms": 40, "p99_ms": 80,
                          "failures": 0}]},
    "machine": MACHINE,
}


def test_the_report_names_the_index_chosen_and_each_load_step(tmp_path) -> None:
    table = markdown(RESULT)
    assert "chosen: **ivf316_nprobe16**, recall@100 0.9700" in table
    assert "| ivf316_nprobe16 | 0.9700 | 0.3000 |" in table
    assert "| served, maxBatchDelay 5 ms | 14.0 | 16.0 | 30.0 | 66.0 |" in table
    assert "| in process | 4.0 | 4.5 | 7.0 | 240.0 |" in table
    assert "Locust, maxBatchDelay 5 ms:" in table
    assert "| 4 | 95.0 | 19000 | 40 | 80 | 0 |" in table
    assert "The machine is shared" in table and "Machine: test CPU" in table
    plot(RESULT, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_options_are_checked(capsys) -> None:
    assert parse_args([]).items == 100_000
    with pytest.raises(SystemExit):
        parse_args(["--k", "300", "--candidates", "200"])
    assert "--k must be <= --candidates" in capsys.readouterr().err
    assert parse_args(["--batch-delays", "2,0"]).batch_delays == [2, 0]
    for bad in ("5,5", "-1", "a"):
        with pytest.raises(SystemExit):
            parse_args(["--batch-delays", bad])
        assert "--batch-delays must be" in capsys.readouterr().err
