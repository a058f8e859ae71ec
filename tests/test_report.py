"""The report command: runs grouped per strategy and setting, mean ± std over seeds."""

from __future__ import annotations

import json

import pytest

from lorm_flwr.config import RunConfig
from lorm_flwr.report import find_runs, group_runs, main, markdown


def _run(root, name, strategy, seed, final, forgetting, up, **cfg):
    folder = root / name
    folder.mkdir(parents=True)
    results = {
        "status": "completed",
        "config": RunConfig(strategy=strategy, seed=seed, output_dir=str(root), **cfg).to_dict(),
        "task_end": [{"accuracy": 0.9}, {"accuracy": final}],
        "final_average_accuracy": final,
        "average_forgetting": forgetting,
        "bytes_up_total": up,
        "bytes_down_total": up // 10,
        "accuracy_kind": "global",
    }
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def test_runs_group_by_setting_and_report_mean_and_std_over_seeds(tmp_path, capsys):
    _run(tmp_path, "a", "lorm", 0, 0.5, 0.2, 2_000_000)
    _run(tmp_path, "b", "lorm", 1, 0.7, 0.4, 2_000_000)
    _run(tmp_path, "c", "fedit", 0, 0.3, 0.1, 1_000_000)
    _run(tmp_path, "d", "lorm", 0, 0.9, None, 2_000_000, num_tasks=1)
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "results.json").write_text(json.dumps({"status": "failed", "config": {}}))
    # tracking=mlflow keeps a copy of results.json as an artifact inside the run: not a run
    artifacts = tmp_path / "a" / "mlruns" / "1" / "abc" / "artifacts"
    artifacts.mkdir(parents=True)
    (artifacts / "results.json").write_text((tmp_path / "a" / "results.json").read_text())
    assert len(find_runs([tmp_path])) == 4
    groups = group_runs(find_runs([tmp_path]))
    assert [g.label for g in groups] == [
        "lorm num-tasks=5",
        "fedit num-tasks=5",
        "lorm num-tasks=1",
    ]
    table = markdown(groups)
    row = next(line for line in table.splitlines() if line.startswith("| lorm num-tasks=5"))
    # final 0.5, 0.7 -> 0.600 ± 0.141; incremental (0.9+0.5)/2, (0.9+0.7)/2 -> 0.750 ± 0.071
    assert "| 0, 1 | 0.600 ± 0.141 | 0.750 ± 0.071 | 0.300 ± 0.141 | 2.0 ± 0.0 |" in row
    assert "| n/a |" in next(line for line in table.splitlines() if "num-tasks=1" in line)
    main([str(tmp_path), "--plot", str(tmp_path / "cmp.png")])
    out = capsys.readouterr().out
    assert "skipped" in out and "fedit num-tasks=5" in out
    assert (tmp_path / "cmp.png").stat().st_size > 1000


def test_no_runs_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no completed runs"):
        main([str(tmp_path)])
