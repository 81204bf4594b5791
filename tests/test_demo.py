"""The demo's logic and page through gradio's HTTP protocol, as the browser speaks it (no browser):
review tables, downloads, model resolution, friendly errors, hostile uploads and the safe launch
settings (private folder, logins, limits per image and per client)."""

import csv
import io
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hemcap import review
from hemcap.cli import _import_demo_app, main
from hemcap.smear import CellReport, SmearReport
from hemcap.schema import load_schema
from hostile import write_hostile_files

gr = pytest.importorskip("gradio", reason="the demo needs gradio (pip install -e '.[demo]')")
# gradio 6.31's queue calls pandas options that pandas 3 deprecates; nothing of ours
pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")
demo_app = _import_demo_app()  # demo/app.py: installed, or beside hemcap/ in a checkout

EXAMPLES = Path(demo_app.EXAMPLES_DIR)
SCHEMA = load_schema("wbcatt")


class PageError(Exception):
    """The sentence the page shows when an analysis is refused or fails."""


@pytest.fixture(scope="module")
def folder():
    """The server's private folder, made before the page as `demo.launch` does."""
    private = demo_app.PrivateFolder()
    yield private
    private.remove()


@pytest.fixture(scope="module")
def reviewer(tiny_blip_dir, folder):
    return demo_app.load_reviewer(tiny_blip_dir, folder.reports)


@pytest.fixture(scope="module")
def page(reviewer):
    """The page served on a free port of 127.0.0.1 with the demo's settings."""
    app = demo_app.serve(demo_app.build_app(reviewer), port=free_port())
    yield app
    app.close()


def analyse(app, path, kind="auto", red_cell_px=60, session="tests"):
    """The page's analysis as the browser runs it: upload the file, join the queue with the upload
    event's function, read the event stream. The outputs, or PageError with the page's sentence."""
    import httpx

    url = app.local_url.rstrip("/") + "/gradio_api"
    with httpx.Client(timeout=60) as http, open(path, "rb") as file:
        uploaded = http.post(f"{url}/upload", files={"files": (Path(path).name, file)}).json()[0]
        data = [{"path": uploaded, "orig_name": Path(path).name, "meta": {"_type": "gradio.FileData"}}, kind,
                red_cell_px]
        joined = http.post(f"{url}/queue/join", json={"data": data, "fn_index": analysis_fn(app),
                                                     "session_hash": session})
        if joined.status_code != 200:
            raise PageError(json.dumps(joined.json()["detail"]))
        return completed(http, f"{url}/queue/data", session)


def completed(http, url: str, session: str) -> list:
    with http.stream("GET", url, params={"session_hash": session}) as stream:
        for line in stream.iter_lines():
            message = json.loads(line[5:]) if line.startswith("data:") else {}
            if message.get("msg") == "process_completed":
                if not message["success"]:
                    raise PageError(message["output"]["error"])
                return message["output"]["data"]
    raise PageError("the event stream ended without a result")


def analysis_fn(app) -> int:
    """The id of the listener an upload or the Analyse button starts."""
    return next(i for i, fn in app.fns.items() if fn.name == "analyse" and len(fn.targets) == 2)


@pytest.fixture(scope="module")
def empty_smear(tmp_path_factory) -> Path:
    from hemcap.synthetic import draw_smear

    image, cells = draw_smear(3, n_wbc=0)
    assert cells == []
    path = tmp_path_factory.mktemp("empty") / "no_white_cells.jpg"
    image.save(path, quality=90)
    return path


def cell(index=1, **overrides) -> CellReport:
    attributes = {name: SCHEMA.values(name)[0] for name in SCHEMA.field_names}
    fields = dict(box=(0, 0, 10, 10), detector_score=0.9, caption="a caption", attributes=attributes,
                  confidences=dict.fromkeys(attributes, 0.9), contradictions={}, flags=[])
    fields.update(overrides)
    return CellReport(index, **fields)


# ------------------------------------------------------------------------------ the bundled examples


def test_examples_are_small_synthetic_images():
    files = {path.name: path for path in EXAMPLES.iterdir()}
    assert set(files) == {name for name, _ in demo_app.EXAMPLES}
    assert sum(path.stat().st_size for path in files.values()) < 400_000
    from hemcap.images import load_rgb

    assert load_rgb(files["smear_1.jpg"]).size == (640, 480)
    assert load_rgb(files["cell_neutrophil.png"]).size == (128, 128)


# ------------------------------------------------------------------------------ analysis


def test_smear_gives_numbered_cells_overlay_and_downloads(reviewer):
    result = reviewer.analyse(EXAMPLES / "smear_1.jpg", "auto", 60)
    report = result.report
    assert report.kind == "smear" and len(report.cells) == 4  # the four drawn cells
    assert [c.index for c in report.cells] == [1, 2, 3, 4] and all(c.box and c.crop for c in report.cells)
    assert result.overlay.size == (640, 480)
    assert all(crop.width > 100 for crop in result.crops)  # shown at the smear's resolution, not the model's 64 px
    document = json.loads(result.downloads["json"].read_text())
    assert document["image"] == "smear_1.jpg"  # the name only, never a server path
    assert document["note"] == review.RESEARCH_NOTE and document["model"]
    rows = list(csv.DictReader(io.StringIO(result.downloads["csv"].read_text())))
    assert [row["cell"] for row in rows] == ["1", "2", "3", "4"]
    assert {*SCHEMA.field_names, *(f"{n}_confidence" for n in SCHEMA.field_names)} <= set(rows[0])
    assert rows[0]["caption"] == report.cells[0].caption


def test_single_cell_is_told_apart_and_can_be_forced(reviewer):
    cell_result = reviewer.analyse(EXAMPLES / "cell_neutrophil.png", "auto", 60)
    assert cell_result.report.kind == "cell" and len(cell_result.report.cells) == 1
    assert cell_result.report.cells[0].box is None
    forced = reviewer.analyse(EXAMPLES / "smear_2.jpg", "cell", 60)
    assert forced.report.kind == "cell" and len(forced.report.cells) == 1


def test_upload_and_button_are_one_private_listener(page):
    """An upload starts one analysis; a click while it runs is dropped; no API endpoint is offered."""
    import httpx

    listeners = [fn for fn in page.fns.values() if fn.name == "analyse"]
    both = next(fn for fn in listeners if len(fn.targets) == 2)
    assert {event for _, event in both.targets} == {"upload", "click"} and both.trigger_mode == "once"
    assert len(listeners) == 2  # and the examples' one, on the same single worker
    assert {fn.concurrency_id for fn in listeners} == {"analysis"} and all(fn.validator for fn in listeners)
    assert {fn.api_visibility for fn in listeners} == {"private"}
    info = httpx.get(page.local_url.rstrip("/") + "/gradio_api/info", timeout=10).json()
    assert info["named_endpoints"] == {}


def test_page_shows_a_smear_through_gradio(page):
    """The whole event over HTTP: gradio's upload and preprocessing, the handler, its postprocessing."""
    outputs = analyse(page, EXAMPLES / "smear_2.jpg")
    status = outputs[0]
    assert "4 white cells found" in status
    rendered = json.dumps(outputs, default=str)
    assert "Total" in rendered and "Cell 4" in rendered and "_hemcap.csv" in rendered


def test_non_image_upload_gets_a_friendly_message(page, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(PageError) as caught:
        analyse(page, text)
    message = str(caught.value)
    assert message.startswith("notes.png cannot be analysed: not an image file")
    assert str(tmp_path) not in message and "Traceback" not in message
    text = text.rename(tmp_path / "notes.txt")  # refused by the upload box's file types, before the analysis
    with pytest.raises(PageError, match="Invalid file type") as caught:
        analyse(page, text)
    assert str(tmp_path) not in str(caught.value) and "gradio" not in str(caught.value)


def test_hostile_uploads_get_one_plain_sentence_and_the_page_goes_on(page, tmp_path):
    for name, reason in write_hostile_files(tmp_path).items():
        with pytest.raises(PageError) as caught:
            analyse(page, tmp_path / name)
        assert str(caught.value) == f"{name} cannot be analysed: {reason}."
    assert "4 white cells found" in analyse(page, EXAMPLES / "smear_1.jpg")[0]


def file_paths(value) -> list[str]:
    """Every served file's server path in a page update."""
    if isinstance(value, str) or not isinstance(value, (dict, list)):
        return []
    own = [value["path"]] if isinstance(value, dict) and isinstance(value.get("path"), str) else []
    return own + [path for item in (value.values() if isinstance(value, dict) else value) for path in file_paths(item)]


def test_uploads_pictures_and_reports_stay_in_the_private_folder(page, folder):
    """Gradio's default /tmp/gradio is shared by every user of the machine (0755/0644)."""
    assert stat.S_IMODE(folder.path.stat().st_mode) == 0o700
    assert os.environ["GRADIO_TEMP_DIR"] == str(folder.path / "gradio")
    paths = file_paths(analyse(page, EXAMPLES / "smear_1.jpg"))
    assert len(paths) >= 7  # the overlay, four crops, two downloads
    assert all(Path(path).resolve().is_relative_to(folder.path.resolve()) for path in paths)
    assert {p.name for p in (folder.path / "gradio").rglob("smear_1.jpg")}  # the upload itself


def test_one_analysis_waiting_or_running_per_client(page, reviewer, monkeypatch):
    """A second analysis from the same client is refused before it queues; other clients queue as usual."""
    from concurrent.futures import ThreadPoolExecutor

    real, running, go_on = reviewer.analyse, threading.Event(), threading.Event()

    def held(*args, **kwargs):  # the first analysis waits until the test has made its other requests
        if not running.is_set():
            running.set()
            go_on.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(reviewer, "analyse", held)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(analyse, page, EXAMPLES / "smear_1.jpg", session="a")
        assert running.wait(30)
        with pytest.raises(PageError, match="still waiting or running"):
            analyse(page, EXAMPLES / "smear_2.jpg", session="a")
        other = pool.submit(analyse, page, EXAMPLES / "smear_2.jpg", session="b")
        time.sleep(0.3)  # b joins the queue behind a
        go_on.set()
        assert "white cells found" in first.result(60)[0] and "white cells found" in other.result(60)[0]
    assert "white cells found" in analyse(page, EXAMPLES / "smear_2.jpg", session="a")[0]


def test_an_admission_lapses_when_its_analysis_never_runs():
    clients = demo_app.OnePerClient(hold_s=0.2)
    assert clients.admit("10.0.0.1") and not clients.admit("10.0.0.1") and clients.admit("10.0.0.2")
    time.sleep(0.25)
    assert clients.admit("10.0.0.1")
    clients.release("10.0.0.1")
    assert clients.admit("10.0.0.1")


def test_cells_per_image_are_capped_and_the_page_says_so(reviewer, tmp_path):
    capped = demo_app.Reviewer(reviewer.engine, reviewer.model, tmp_path, max_cells=2)
    result = capped.analyse(EXAMPLES / "smear_1.jpg", "smear", 60)
    assert [cell.index for cell in result.report.cells] == [1, 2] and len(result.crops) == 2
    assert "captioned the first 2 of 4 white cells found" in demo_app.status_markdown(result)
    full = reviewer.analyse(EXAMPLES / "smear_1.jpg", "smear", 60).report.cells
    best = sorted(full, key=lambda cell: -cell.detector_score)[:2]
    assert sorted(cell.box for cell in best) == sorted(cell.box for cell in result.report.cells)


def test_report_folders_older_than_an_hour_go_on_the_next_analysis(reviewer):
    old, recent = reviewer.workdir / "old-analysis", reviewer.workdir / "recent-analysis"
    for folder in (old, recent):
        folder.mkdir(parents=True)
        (folder / "report.json").write_text("{}")
    hour_ago = time.time() - demo_app.MAX_AGE_S - 60
    os.utime(old, (hour_ago, hour_ago))
    reviewer.analyse(EXAMPLES / "cell_neutrophil.png", "cell", 60)
    assert not old.exists() and recent.exists()


def test_missing_file_and_internal_failure_stay_one_sentence(reviewer, monkeypatch):
    with pytest.raises(gr.Error) as caught:
        demo_app.run_review(reviewer, None, "auto", 60)
    assert caught.value.message == demo_app.NO_IMAGE

    def explode(*args, **kwargs):
        raise RuntimeError("/secret/server/path exploded")

    monkeypatch.setattr(reviewer, "analyse", explode)
    with pytest.raises(gr.Error) as caught:
        demo_app.run_review(reviewer, str(EXAMPLES / "smear_1.jpg"), "auto", 60)
    assert caught.value.message == demo_app.FAILED.format(name="smear_1.jpg") and "/secret" not in caught.value.message


def test_image_without_cells_gives_an_empty_report(reviewer, page, empty_smear):
    result = reviewer.analyse(empty_smear, "auto", 60)
    assert result.report.kind == "smear" and result.report.cells == []
    assert review.differential_table(result.report).rows[-1] == ["Total", 0, "0.0"]
    status = analyse(page, empty_smear)[0]
    assert "0 white cells found" in status and "red-cell diameter" in status
    assert json.loads(result.downloads["json"].read_text())["cells"] == []


# ------------------------------------------------------------------------------ tables


def test_attribute_table_marks_low_confidence_contradiction_and_missing():
    target = SCHEMA.cell_type_field
    shape_values = list(SCHEMA.values("cell_shape"))
    doubtful = cell(2, confidences={**dict.fromkeys(SCHEMA.field_names, 0.9), "cell_size": 0.2},
                    contradictions={"cell_shape": shape_values},
                    flags=["low confidence: cell_size (0.20)", "contradiction: cell_shape"])
    doubtful.attributes["cell_shape"] = None
    doubtful.attributes["granularity"] = None
    report = SmearReport("s.jpg", 10, 10, [cell(1), doubtful], {}, [2], [])
    table = review.attribute_table(report, SCHEMA, min_confidence=0.5)
    assert table.headers == ["Attribute", "Cell 1", "Cell 2"]
    rows = {row[0]: row for row in table.rows}
    marks = {row[0]: mark for row, mark in zip(table.rows, table.marks)}
    assert table.rows[0][0] == review.field_label(target)  # the cell type comes first
    assert rows["Cell size"][2].startswith("⚠ ") and marks["Cell size"][2] == review.LOW
    assert rows["Cell shape"][2] == "✗ " + " / ".join(shape_values) and marks["Cell shape"][2] == review.CONTRADICTION
    assert rows["Granularity"][2] == review.NOT_STATED and marks["Granularity"][2] == review.MISSING
    assert rows["Cell size"][1].endswith("(0.90)") and marks["Cell size"][1] == ""
    assert rows["Flags"][1:] == ["none", "⚠ 2 flags"]
    summary = review.flag_summary(doubtful, SCHEMA, 0.5)
    assert summary[0].startswith("contradicts itself on cell shape") and "cell size" in summary[-1]


def test_single_cell_table_lists_every_field_once():
    table = review.cell_table(cell(confidences={**dict.fromkeys(SCHEMA.field_names, 0.9), "cell_size": 0.1}),
                              SCHEMA, 0.5)
    assert [row[0] for row in table.rows] == [review.field_label(n) for n in review.review_fields(SCHEMA)]
    size = next(row for row in table.rows if row[0] == "Cell size")
    assert size[2] == "0.10" and size[3].startswith("low confidence")


def test_differential_table_hides_an_empty_unclassified_row():
    from hemcap.smear import differential

    cells = [cell(1), cell(2)]
    report = SmearReport("s.jpg", 10, 10, cells, differential(cells, SCHEMA.values("cell_type"), "cell_type"), [], [])
    rows = review.differential_table(report).rows
    assert [row[0] for row in rows] == [*SCHEMA.values("cell_type"), "Total"]
    assert rows[0][1:] == [2, "100.0"] and rows[-1] == ["Total", 2, "100.0"]


def test_download_names_are_safe():
    assert review.safe_stem("../../etc/passwd") == "passwd"
    assert review.safe_stem("my smear (1).JPG") == "my_smear_1"
    assert review.safe_stem("") == "image"


# ------------------------------------------------------------------------------ the model


def fake_model(path: Path, training: dict | None = None) -> Path:
    """A model folder's info without weights: what review reads."""
    from hemcap.models import ModelInfo, write_model_info
    from hemcap.schema import load_schema

    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    write_model_info(path, ModelInfo(backend="blip", schema=dict(load_schema("wbcatt").raw), training=training or {}))
    return path


def test_without_model_the_newest_quickstart_run_is_used(tmp_path):
    import os

    older = fake_model(tmp_path / "quickstart-20250101-000000" / "model" / "model")
    newer = fake_model(tmp_path / "quickstart-20250102-000000" / "model" / "model")
    (tmp_path / "quickstart-20250103-000000" / "model").mkdir(parents=True)  # still training: no model yet
    os.utime(older, (1, 1))
    path, origin = review.resolve_model_dir(None, tmp_path)
    assert path == newer and "newest quickstart model" in origin
    assert review.summarize_model(path).name == "quickstart-20250102-000000/model/model"
    with pytest.raises(FileNotFoundError, match="run `hemcap quickstart` first"):
        review.resolve_model_dir(None, tmp_path / "empty")


def test_missing_model_dir_refuses_to_start(tmp_path, capsys):
    code = main(["demo", "--model", str(tmp_path / "no_such_model")])
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err and "Traceback" not in err
    assert main(["demo", "--model", str(tmp_path)]) == 2  # a folder without a model
    assert "is not a hemcap model folder" in capsys.readouterr().err


def test_model_summary_prefers_the_test_report(tmp_path):
    training = {"metrics": {"attribute_accuracy": 0.9, "cell_type_accuracy": 0.8, "cider": 1.5},
                "data": {"recipe": "synthetic", "train_images": 600, "val_images": 100, "schema": "wbcatt"},
                "init": "scratch"}
    model = fake_model(tmp_path / "run" / "model", training)
    summary = review.summarize_model(model)
    assert summary.name == "run/model" and summary.recipe == "synthetic"
    assert "trained from random weights on synthetic data (600 training images" in summary.description
    assert summary.figures[0] == ("Mean attribute accuracy", "90.0%") and "validation" in summary.source
    report = {"n": 200, "caption": {"cider_d": 2.5}, "faithfulness": {
        "attribute_mean": {"accuracy": 0.97}, "targets": ["cell_type"], "fields": {"cell_type": {"accuracy": 0.99}}}}
    (tmp_path / "run" / "report").mkdir()
    (tmp_path / "run" / "report" / "metrics.json").write_text(json.dumps(report))
    quickstart = fake_model(tmp_path / "quickstart-1" / "model" / "model", training)  # hemcap quickstart's layout
    (tmp_path / "quickstart-1" / "report").mkdir()
    (tmp_path / "quickstart-1" / "report" / "metrics.json").write_text(json.dumps(report))
    assert review.summarize_model(quickstart).source == "held-out test set, 200 images"
    summary = review.summarize_model(model)
    assert summary.figures == [("Mean attribute accuracy", "97.0%"), ("Cell-type accuracy", "99.0%"),
                               ("CIDEr-D", "2.500")]
    assert summary.source == "held-out test set, 200 images"
    assert review.summarize_model(fake_model(tmp_path / "bare")).figures == []


def test_model_summary_reads_a_hub_model_card(tmp_path):
    """A model whose info records no training (a hand-made upload) still shows its card's figures."""
    from hemcap.hub import build_model_card
    from hemcap.models import read_model_info, write_model_info

    training = {"metrics": {"attribute_accuracy": 0.91, "cell_type_accuracy": 0.95, "cider": 1.2},
                "data": {"recipe": "wbcatt", "train_images": 6000, "val_images": 1000, "schema": "wbcatt"}}
    model = fake_model(tmp_path / "downloaded", training)
    build_model_card(model, "someone/hemcap-blip").save(model / "README.md")
    info = read_model_info(model)
    info.training = {}
    write_model_info(model, info)
    summary = review.summarize_model(model)
    assert ("mean attribute accuracy", "91.0%") in summary.figures and "validation" in summary.source


def test_synthetic_models_default_to_the_synthetic_magnification(tmp_path, reviewer):
    assert reviewer.default_red_cell_px == demo_app.MEASURE  # the fixture model has no training record: measured per image
    summary = review.ModelSummary("m", "d", [], "s", recipe="synthetic")
    assert demo_app.Reviewer(reviewer.engine, summary, tmp_path).default_red_cell_px == demo_app.SYNTHETIC_RED_CELL_PX


# ------------------------------------------------------------------------------ serving


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_served_page_binds_localhost_without_share_and_limits_uploads(page, tmp_path):
    import httpx

    app = page
    assert app.server_name == "127.0.0.1" and not app.share
    assert app.max_file_size == 20 * 1024 * 1024
    url = app.local_url.rstrip("/")
    assert httpx.get(url + "/", timeout=10).status_code == 200
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\0" * (21 * 1024 * 1024))
    with big.open("rb") as f:
        response = httpx.post(url + "/gradio_api/upload", files={"files": ("big.jpg", f)}, timeout=30)
    assert response.status_code == 413


def test_a_taken_port_is_one_clear_error(page, reviewer):
    taken = int(page.local_url.rstrip("/").rsplit(":", 1)[1])
    with pytest.raises(OSError, match=f"cannot serve on 127.0.0.1:{taken}: the port is taken"):
        demo_app.serve(demo_app.build_app(reviewer), port=taken)


def test_a_page_other_machines_reach_needs_logins(reviewer, tiny_blip_dir, tmp_path, capsys):
    for host, share in (("0.0.0.0", False), ("192.168.1.20", False), ("127.0.0.1", True)):
        with pytest.raises(PermissionError, match="--auth-file"):
            demo_app.logins_for(host, share, None)
    assert demo_app.logins_for("127.0.0.1", False, None) is None
    assert demo_app.logins_for("localhost", False, None) is None
    with pytest.raises(PermissionError, match="--host 0.0.0.0 would show patient images"):
        demo_app.serve(demo_app.build_app(reviewer), host="0.0.0.0", port=free_port())
    assert main(["demo", "--model", str(tiny_blip_dir), "--share"]) == 2
    err = capsys.readouterr().err
    assert "--share would show patient images to anyone" in err and "Traceback" not in err


def test_logins_file_lines_and_its_errors_never_show_a_password(tiny_blip_dir, tmp_path, capsys):
    logins = tmp_path / "logins"
    logins.write_text("# reviewers\nana:s3cret:with:colons\n\n  ben:pw2  \n")
    assert demo_app.read_logins(logins) == [("ana", "s3cret:with:colons"), ("ben", "pw2")]
    logins.write_text("ana:s3cret\nben-without-password\n")
    with pytest.raises(ValueError, match=r"logins, line 2: expected user:password") as caught:
        demo_app.read_logins(logins)
    assert "ben" not in str(caught.value)
    logins.write_text("ana:\n")  # an empty password
    assert main(["demo", "--auth-file", str(logins), "--host", "0.0.0.0", "--model", str(tiny_blip_dir)]) == 2
    assert "line 1: expected user:password" in capsys.readouterr().err


def test_page_with_logins_refuses_anonymous_visitors(reviewer):
    import httpx

    app = demo_app.serve(demo_app.build_app(reviewer), port=free_port(), auth=[("ana", "s3cret")])
    try:
        url = app.local_url.rstrip("/")
        files = {"files": ("smear_1.jpg", (EXAMPLES / "smear_1.jpg").read_bytes())}
        assert httpx.post(url + "/gradio_api/upload", files=files, timeout=10).status_code == 401
        assert httpx.get(url + "/config", timeout=10).status_code == 401
        with httpx.Client(timeout=10) as http:
            assert http.post(url + "/login", data={"username": "ana", "password": "wrong"}).status_code == 400
            assert http.post(url + "/login", data={"username": "ana", "password": "s3cret"}).status_code == 200
            assert http.post(url + "/gradio_api/upload", files=files).status_code == 200
    finally:
        app.close()


def test_library_import_does_not_load_gradio():
    code = "import sys, hemcap, hemcap.review, hemcap.cli; sys.exit('gradio' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
