"""Records file: the shipped records are predicted within the goals; bad files fail with one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scalelab.cli import main as cli_main
from scalelab.errors import DataError
from scalelab.perf.records import predict_records, read_records, summary

REPO = Path(__file__).resolve().parents[1]
HEADER = "name,accelerator,count,per_node,interconnect,global_batch,epochs,time_s\n"


def test_shipped_records_match_design_and_goals():
    records = read_records(REPO / "records.csv")
    assert [r.name for r in records] == ["goyal-2017", "you-2017", "akiba-2017", "jia-2018",
                                         "mlperf-v3.0-64xH100", "mlperf-v2.0-64xA100"]
    s = summary(predict_records(records))
    assert s["max_error"] <= 1.5 and s["median_error"] < 1.25, s


def _write(tmp_path, body: str) -> Path:
    f = tmp_path / "r.csv"
    f.write_text(HEADER + body)
    return f


def test_unknown_hardware_lists_known(tmp_path):
    f = _write(tmp_path, "x,h200,64,8,8xib-ndr,3200,35,100\n")
    with pytest.raises(DataError, match=r"r.csv:2: unknown accelerator 'h200'; known: .*a100.*h100"):
        read_records(f)
    f = _write(tmp_path, "x,h100,64,8,8xib-xdr,3200,35,100\n")
    with pytest.raises(DataError, match=r"r.csv:2: unknown interconnect 'ib-xdr'; known: .*ib-ndr"):
        read_records(f)


@pytest.mark.parametrize("row, message", [
    ("x,h100,sixty,8,8xib-ndr,3200,35,100\n", "r.csv:2: count must be an integer, got 'sixty'"),
    ("x,h100,64,8,8xib-ndr,3200,35\n", "r.csv:2: 7 fields, expected 8"),
    ("x,h100,64,8,8xib-ndr,3200,-1,100\n", "r.csv:2: epochs must be > 0"),
    ("x,h100,64,8,8xib-ndr,,35,100\n", "r.csv:2: empty global_batch"),
])
def test_bad_rows_name_the_line(tmp_path, row, message):
    f = _write(tmp_path, "ok,h100,64,8,8xib-ndr,3200,35,100\n" + row.replace("r.csv:2", "r.csv:3"))
    with pytest.raises(DataError, match=message.replace("r.csv:2", "r.csv:3")):
        read_records(f)


def test_missing_column_and_file(tmp_path):
    f = tmp_path / "r.csv"
    f.write_text("name,accelerator\nx,h100\n")
    with pytest.raises(DataError, match="missing column"):
        read_records(f)
    with pytest.raises(DataError, match="not found"):
        read_records(tmp_path / "nope.csv")


def test_empty_cells_are_assumed(tmp_path):
    f = _write(tmp_path, "x,knl,16,,,256,90,1000\n")
    (r,) = predict_records(read_records(f))
    assert len(r["assumptions"]) == 2


def test_cli_records_json_and_errors(run_cli, tmp_path):
    proc = run_cli("project", "--records", REPO / "records.csv", "--json", check=True)
    rows = json.loads(proc.stdout)
    assert {"name", "predicted_s", "actual_s"} <= set(rows[0]) and len(rows) == 6
    bad = _write(tmp_path, "x,h200,64,8,8xib-ndr,3200,35,100\n")
    proc = run_cli("project", "--records", bad)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("scalelab: error:") and len(proc.stderr.strip().splitlines()) == 1


def test_cli_projection_and_sweep(run_cli, tmp_path, capsys):
    proc = run_cli("project", "--model", "resnet50", "--dataset", "imagenet", "--hardware", "h100",
                   "--devices", "64", "--per-node", "8", "--interconnect", "8xib-ndr", "--batch", "3264",
                   "--epochs", "40", "--compress", "dgc:0.999", check=True)
    for word in ("compute per step", "communication", "overlapped", "input pipeline", "steps",
                 "time-to-train"):
        assert word in proc.stdout
    # the same command line in this process (the subprocess above is the user's path): it reuses the
    # cached ResNet-50 FLOP count instead of counting it again in a new interpreter
    png = tmp_path / "sweep.png"
    assert cli_main(["project", "--hardware", "v100", "--devices", "1..4096", "--noise-scale", "20000",
                     "--min-steps", "3000", "--plot", str(png), "--json"]) == 0
    ps = json.loads(capsys.readouterr().out)
    assert [p["setup"]["devices"] for p in ps][-1] == 4096 and png.stat().st_size > 1000
    assert cli_main(["project", "--hardware", "nope"]) == 2 and "known:" in capsys.readouterr().err
