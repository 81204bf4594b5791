"""End-to-end tests of the real `hemcap` command on tiny synthetic data."""

import subprocess
import sys

from hemcap.cli import main
from hemcap.recipes import load_prepared


def hemcap(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hemcap.cli", *args], capture_output=True, text=True, timeout=600)


def test_prepare_synthetic_writes_a_dataset(tmp_path):
    out = tmp_path / "synthetic"
    result = hemcap("prepare", "synthetic", "--out", str(out), "--n-train", "6", "--n-val", "2", "--n-test", "3", "--size", "64")
    assert result.returncode == 0, result.stderr
    assert "train 6, validation 2, test 3" in result.stdout
    dataset, meta = load_prepared(out)
    assert meta["recipe"] == "synthetic" and dataset["train"][0]["image"].size == (64, 64)
    assert (out / "hemcap_dataset.json").is_file() and (out / "dataset_dict.json").is_file()


def test_prepare_refuses_to_clobber(tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    code = main(["prepare", "synthetic", "--out", str(out), "--n-train", "2", "--n-val", "1", "--n-test", "1"])
    assert code == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err


def test_bad_csv_gets_one_clear_error(tmp_path, capsys):
    table = tmp_path / "cells.csv"
    table.write_text("path,label\nmissing.jpg,Neutrophil\n")
    code = main(["prepare", "csv", "--csv", str(table), "--out", str(tmp_path / "ds")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "missing column 'cell_size'" in err and "missing column 'granularity'" in err


def test_refine_names_every_reason_it_cannot_fit(model_dir, tmp_path, capsys):
    data = tmp_path / "cells"
    assert main(["prepare", "synthetic", "--out", str(data), "--n-train", "2", "--n-val", "1", "--n-test", "1"]) == 0
    before = sorted(p.name for p in model_dir.iterdir())
    code = main(["refine", "--model", str(model_dir), "--data", str(data), "--fields", "nucleus_shape", "lobes"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "field 'lobes' is not in the model's schema" in err and "has no attribute heads" in err
    assert sorted(p.name for p in model_dir.iterdir()) == before  # nothing written
