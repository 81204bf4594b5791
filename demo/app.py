"""``hemcap demo``: a web page where a reviewer checks what a trained model says about a smear or
a single white cell.

Upload a smear image or a single-cell crop (told apart automatically, or chosen), or pick a
bundled synthetic example. For a smear the page shows the image with numbered boxes, the
differential count, the cell crops with their captions, and every cell's attributes with their
confidences, the doubtful ones marked; for one cell, its caption and attribute table. The report
downloads as JSON and CSV. The model loads once at start; the cells of an image are captioned in
one batch (``SmearPipeline`` over ``CaptionEngine``).

Safe defaults:

- It binds 127.0.0.1 and makes no share link unless asked; ``--share`` or another ``--host`` needs
  logins (``--auth-file``, one ``user:password`` a line), as the page shows patient images.
- Uploads, the pictures it shows and the reports it writes live in a private folder of this server
  (mode 0700, ``GRADIO_TEMP_DIR``), never in gradio's shared ``/tmp/gradio``; it is removed when the
  server stops (Ctrl+C or SIGTERM). Uploads and reports are deleted once they are an hour old.
- Only JPEG, PNG, TIFF, BMP and WebP files up to 20 MB and 12 megapixels are read
  (``hemcap.images.IMAGE_FORMATS``); at most 60 cells of an image are captioned, and the page says
  so when there were more.
- One analysis runs at a time; each client (an address, or a browser session on this machine) may
  have one analysis waiting or running; an upload starts one analysis, and the Analyse button
  re-runs it (not both at once). The analysis has no public API endpoint.
- No run history is kept in the browser. Problems reach the page as one plain sentence that names
  the file and never a server path; details go to the server log only.
"""

from __future__ import annotations

import html
import ipaddress
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

# No telemetry and no version check: the demo must work offline and may see patient images.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402

from hemcap import review  # noqa: E402
from hemcap.images import IMAGE_SUFFIXES, ImageError, load_rgb  # noqa: E402
from hemcap.smear import (Detection, Detector, SmearPipeline, SmearReport, StainDetector,  # noqa: E402
                          build_detector, crop_cells, draw_overlay)
from hemcap.smear.report import describe_red_cells  # noqa: E402

log = logging.getLogger("hemcap.demo")

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
EXAMPLES = (  # drawn by demo/make_examples.py with hemcap.synthetic: no patient data
    ("smear_1.jpg", "Synthetic smear, 4 white cells"),
    ("smear_2.jpg", "Synthetic smear, 4 white cells"),
    ("cell_neutrophil.png", "Synthetic neutrophil"),
    ("cell_eosinophil.png", "Synthetic eosinophil"),
    ("cell_lymphocyte.png", "Synthetic lymphocyte"),
)
MAX_UPLOAD = "20mb"  # a 12-megapixel JPEG is about 5 MB, a 12-megapixel PNG of a smear about 15
MAX_PIXELS = 12_000_000  # a 4000x3000 camera frame; the library's 40 MP (hemcap.images) is for batches
MAX_CELLS = 60  # BLIP-base captions 0.82 s a cell on 2 CPU threads (BENCHMARKS.md): 60 cells ~50 s
MAX_AGE_S = 3600  # uploads, pictures and reports older than an hour are deleted ...
CLEAN_EVERY_S = 1800  # ... checked every half hour (reports: on each analysis)
CLIENT_HOLD_S = 180  # a client's admitted analysis not finished after 3 min (a worst case ~50 s) was dropped
SYNTHETIC_RED_CELL_PX = 60  # hemcap.synthetic smears (640x480): red cells 0.41 x 0.29 x 480 px across
BCCD_RED_CELL_PX = 100  # BCCD fields (640x480 at 100x oil), the stain detector's scale 1
MEASURE = 0  # the red-cell slider's value for "measure it on the image" (hemcap.smear.magnification)
DISPLAY_MIN_SIDE = 320  # px: cell pictures smaller than this are enlarged on the page
MIN_CONFIDENCE = 0.5  # attributes stated with a lower token probability are marked for review
KIND_CHOICES = [("Detect automatically", "auto"), ("Smear: find the white cells", "smear"), ("One cell", "cell")]
UNREADABLE = "{name} cannot be analysed: {reason}."
NO_IMAGE = "Choose an image first: upload a smear or a single-cell crop, or pick an example."
FAILED = "The analysis of {name} failed. Try another image; the details are in the server log."
BUSY = "Your previous analysis is still waiting or running: wait for its result, then start the next."
EXPOSED = ("{where} would show patient images to anyone who reaches it, with no login: give --auth-file "
           "FILE (one user:password a line), or serve on 127.0.0.1 without --share")
WELCOME = ("Upload a smear or a single-cell image on the left, or pick one of the synthetic examples. "
           "The model's statements appear here, with the doubtful ones marked.")
LEGEND = "⚠ confidence below {:.2f} · ✗ the caption contradicts itself · — not stated"
MARK_STYLES = {review.LOW: "background-color: #fff4d6; color: #6b4a00;",
               review.CONTRADICTION: "background-color: #fde4e4; color: #8a1c1c;",
               review.MISSING: "color: #8b929c;"}
THEME = gr.themes.Default(primary_hue="blue", secondary_hue="slate", neutral_hue="slate", radius_size="sm")
CSS = """
#research-note {background: #fff8e1; border: 1px solid #f0c36d; border-radius: 6px; padding: 8px 14px;}
#research-note p {margin: 0; color: #5c4300;}
#model-card p {margin: 2px 0; font-size: 0.92em;}
#status p {margin: 2px 0;}
#cells-table *, #differential *, #cell-attributes * {font-family: var(--font) !important;}
#cells-table {font-size: 0.92em;}
footer {display: none !important;}
"""


# ------------------------------------------------------------------------------ analysis


@dataclass
class Review:
    """What the page shows for one image."""

    report: SmearReport
    overlay: object  # PIL image: the input with numbered boxes
    crops: list  # PIL images, one per cell, at the input's resolution (the captioner saw them resized)
    seconds: float
    downloads: dict[str, Path]  # "json", "csv" -> file


class Reviewer:
    """The loaded captioner and what the page needs to analyse one image with it."""

    def __init__(self, engine, model: review.ModelSummary, workdir: str | Path,
                 min_confidence: float = MIN_CONFIDENCE, detector: Detector | None = None, max_cells: int = MAX_CELLS):
        self.engine = engine
        self.detector = detector or StainDetector()
        self.model = model
        self.workdir = Path(workdir)
        self.min_confidence = min_confidence
        self.max_cells = max_cells
        self.default_red_cell_px = SYNTHETIC_RED_CELL_PX if model.recipe == "synthetic" else MEASURE

    def analyse(self, path: str | Path, kind: str = "auto", red_cell_px: float | None = None) -> Review:
        """Read, detect, caption and report; ImageError when the file is not a usable image.
        ``red_cell_px`` 0 or None: measured on the image."""
        start, notes = time.perf_counter(), []
        remove_older(self.workdir, MAX_AGE_S)
        image = load_rgb(path, max_pixels=MAX_PIXELS, notes=notes)
        pipeline = SmearPipeline(self.engine, self.detector, min_confidence=self.min_confidence,
                                 red_cell_px=red_cell_px or None, max_cells=self.max_cells)
        report = pipeline.run_auto(image, Path(path).name, kind, notes=notes)  # the name only: no server paths
        downloads = review.write_downloads(report, self.engine.schema, self.workdir / uuid.uuid4().hex,
                                           model=self.model.name)
        crops = [image] if report.kind == "cell" else crop_cells(
            image, [Detection(cell.box, cell.detector_score or 0.0) for cell in report.cells], None, pipeline.margin)
        crops = [enlarged(crop) for crop in crops]
        return Review(report, draw_overlay(image, report), crops, time.perf_counter() - start, downloads)

    def warm_up(self) -> None:
        """Analyse a bundled example once, so the first reviewer does not wait for lazy imports and
        first-call set-up (about 4 s of the first analysis on a CPU, 0.2 s afterwards)."""
        example = EXAMPLES_DIR / EXAMPLES[0][0]
        if example.is_file():
            self.analyse(example, "smear", SYNTHETIC_RED_CELL_PX)


def remove_older(folder: Path, age_s: float) -> None:
    """The analyses' report folders in ``folder`` last written more than ``age_s`` ago."""
    cutoff = time.time() - age_s
    for entry in folder.glob("*"):  # no folder yet: nothing
        if entry.is_dir() and entry.stat().st_mtime < cutoff:
            shutil.rmtree(entry, ignore_errors=True)


# ------------------------------------------------------------------------------ what the page shows


def enlarged(image, min_side: int = DISPLAY_MIN_SIDE):
    """Small crops scaled up for the eye (a 128 px cell shows as a thumbnail otherwise)."""
    from PIL import Image

    factor = min_side / min(image.size)
    if factor <= 1:
        return image
    return image.resize((round(image.width * factor), round(image.height * factor)), Image.LANCZOS)


def styled(table: review.Table):
    """The table as a DataFrame, its marked values coloured (the signs in the text stay)."""
    frame = pd.DataFrame(table.rows, columns=table.headers)
    if not table.rows or not table.marks:
        return frame
    styles = pd.DataFrame([[MARK_STYLES.get(mark, "") for mark in row] for row in table.marks],
                          columns=table.headers)
    return frame.style.apply(lambda _: styles, axis=None)


def model_markdown(model: review.ModelSummary) -> str:
    figures = " · ".join(f"{name} **{value}**" for name, value in model.figures)
    lines = [f"**Model:** `{model.name}`: {model.description}."]
    lines.append(f"**Its results** ({model.source}): {figures}" if figures else f"*{model.source}.*")
    return "\n\n".join(lines)


def status_markdown(result: Review) -> str:
    report = result.report
    if report.kind == "cell":
        head = "**One cell**, captioned as a whole"
    else:
        plural = "" if len(report.cells) == 1 else "s"
        head = f"**Smear:** {len(report.cells)} white cell{plural} found"
        if report.flagged:
            head += f", {len(report.flagged)} flagged for review (⚠)"
        head += f" · {describe_red_cells(report.red_cells)}"
        if not report.cells:
            head += (". If this image holds white cells, check the red-cell diameter against its magnification, "
                     "or choose *One cell* for a single-cell crop")
    lines = [f"{head} · analysed in {result.seconds:.1f} s"]
    if report.warning:  # above the notes: the one line a reader must not miss
        lines.append(f"**⚠ {html.escape(report.warning)}.**")
    return "\n\n".join(lines + [f"*Note: {html.escape(note)}*" for note in report.notes])


def captions_markdown(report: SmearReport, schema, min_confidence: float) -> str:
    lines = ["#### Captions"] if report.cells else []
    for cell in report.cells:
        flags = review.flag_summary(cell, schema, min_confidence)
        why = f" <br>⚠ *{html.escape('; '.join(flags))}*" if flags else ""
        lines.append(f"{cell.index}. {html.escape(cell.caption) or '(empty caption)'}{why}")
    return "\n".join(lines)


def gallery_items(result: Review) -> list[tuple]:
    return [(crop, f"{'⚠ ' if cell.flags else ''}{cell.index}. {cell.caption}")
            for cell, crop in zip(result.report.cells, result.crops)]


def cell_markdown(report: SmearReport, schema, min_confidence: float) -> str:
    cell = report.cells[0]
    flags = review.flag_summary(cell, schema, min_confidence)
    why = "\n\n" + "\n".join(f"- ⚠ {html.escape(flag)}" for flag in flags) if flags else ""
    return f"#### Caption\n\n> {html.escape(cell.caption) or '(empty caption)'}{why}"


# ------------------------------------------------------------------------------ the page


def build_app(reviewer: Reviewer) -> gr.Blocks:
    """The page; its ``analyse`` listeners (no API endpoint) take (file, kind, red-cell diameter in px)."""
    with gr.Blocks(title="hemcap · white cell review", analytics_enabled=False,
                   delete_cache=(CLEAN_EVERY_S, MAX_AGE_S)) as app:
        gr.Markdown("## hemcap · white blood cell review", elem_id="title")
        gr.Markdown(f"**{review.RESEARCH_NOTE}**", elem_id="research-note")
        gr.Markdown(model_markdown(reviewer.model), elem_id="model-card")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=300):
                inputs = input_panel(reviewer.default_red_cell_px)
            with gr.Column(scale=3):
                results = result_panel(reviewer.min_confidence)
        connect(reviewer, inputs, results)
    return app


def input_panel(red_cell_px: float) -> SimpleNamespace:
    """Upload, image type, magnification, the Analyse button, downloads and examples."""
    ui = SimpleNamespace()
    ui.upload = gr.File(label="Smear image or single-cell crop", type="filepath", height=150, elem_id="upload",
                        file_types=sorted(IMAGE_SUFFIXES))
    ui.kind = gr.Radio(KIND_CHOICES, value="auto", label="Image type")
    ui.red_cell = gr.Slider(MEASURE, 250, value=red_cell_px, step=5,
                            label="Red-cell diameter in pixels (0: measure it on the image)",
                            info=f"about {BCCD_RED_CELL_PX} for a 640×480 field at 100× oil; "
                                 f"{SYNTHETIC_RED_CELL_PX} for the synthetic examples")
    ui.button = gr.Button("Analyse", variant="primary")
    with gr.Row():
        ui.json_file = gr.DownloadButton("Report (JSON)", visible=False, size="md")
        ui.csv_file = gr.DownloadButton("Report (CSV)", visible=False, size="md")
    ui.examples = gr.Examples([[str(EXAMPLES_DIR / name), "auto", SYNTHETIC_RED_CELL_PX] for name, _ in EXAMPLES],
                              inputs=[ui.upload, ui.kind, ui.red_cell], cache_examples=False,
                              example_labels=[label for _, label in EXAMPLES],
                              label="Synthetic examples (no patient data)")
    return ui


def result_panel(min_confidence: float) -> SimpleNamespace:
    """A status line, then the smear view or the single-cell view (one shown at a time)."""
    ui = SimpleNamespace(status=gr.Markdown(WELCOME, elem_id="status"))
    legend = LEGEND.format(min_confidence)
    with gr.Column(visible=False) as ui.smear_view:
        with gr.Row(equal_height=False):
            ui.overlay = gr.Image(label="White cells found", type="pil", format="png", interactive=False, scale=3,
                                  elem_id="overlay", buttons=["download", "fullscreen"])
            ui.differential = gr.Dataframe(label="Differential count", interactive=False, scale=2,
                                           elem_id="differential")
        ui.gallery = gr.Gallery(label="Cells and their captions", columns=6, height=230, format="png",
                                object_fit="contain", elem_id="gallery")
        ui.captions = gr.Markdown(elem_id="captions")
        ui.cells_table = gr.Dataframe(label=f"Attributes per cell: {legend}", interactive=False, wrap=True,
                                      max_height=900, elem_id="cells-table")
    with gr.Column(visible=False) as ui.cell_view:
        with gr.Row(equal_height=False):
            ui.cell_image = gr.Image(label="The cell", type="pil", format="png", interactive=False, scale=1,
                                     height=360, elem_id="cell-image")
            with gr.Column(scale=2):
                ui.cell_caption = gr.Markdown(elem_id="cell-caption")
                ui.cell_attributes = gr.Dataframe(label=f"Attributes: {legend}", interactive=False,
                                                  elem_id="cell-attributes")
    return ui


def connect(reviewer: Reviewer, inputs: SimpleNamespace, results: SimpleNamespace) -> None:
    """An upload, the Analyse button and the examples run ``analyse``, one at a time for the whole page
    and one waiting or running per client (``admit``); clearing the upload hides the results."""
    schema, low, r = reviewer.engine.schema, reviewer.min_confidence, results
    outputs = [r.status, r.smear_view, r.overlay, r.differential, r.gallery, r.captions, r.cells_table, r.cell_view,
               r.cell_image, r.cell_caption, r.cell_attributes, inputs.json_file, inputs.csv_file]
    fields = [inputs.upload, inputs.kind, inputs.red_cell]
    clients = OnePerClient()

    def admit(file, kind, red_cell_px, request: gr.Request):
        """Before the queue: refuses a client whose previous analysis has not finished."""
        admitted = clients.admit(client_key(request))
        return [gr.validate(admitted, BUSY), gr.validate(True, ""), gr.validate(True, "")]

    def analyse(file: str | None, kind: str = "auto", red_cell_px: float | None = None, request: gr.Request = None):
        """Review one image: (file, 'auto'|'smear'|'cell', red-cell diameter in px)."""
        try:
            return page_update(run_review(reviewer, file, kind, red_cell_px), r, inputs, schema, low)
        finally:
            clients.release(client_key(request))

    def clear():
        return {r.status: WELCOME, r.smear_view: gr.update(visible=False), r.cell_view: gr.update(visible=False),
                inputs.json_file: gr.update(visible=False), inputs.csv_file: gr.update(visible=False)}

    # One listener for both triggers: a click while the upload's analysis runs is dropped ("once"),
    # and every analysis shares one worker (concurrency_id) whichever listener started it.
    run = dict(fn=analyse, inputs=fields, outputs=outputs, validator=admit, api_visibility="private",
               concurrency_id="analysis", concurrency_limit=1, trigger_mode="once")
    gr.on([inputs.upload.upload, inputs.button.click], **run)
    inputs.examples.load_input_event.then(**run)
    inputs.upload.clear(clear, None, outputs, api_visibility="private")


def page_update(result: Review, r: SimpleNamespace, inputs: SimpleNamespace, schema, low: float) -> dict:
    """What the page shows for ``result``: the smear view or the single-cell view, and the downloads."""
    report, is_cell = result.report, result.report.kind == "cell"
    page = {r.status: status_markdown(result), r.smear_view: gr.update(visible=not is_cell),
            r.cell_view: gr.update(visible=is_cell),
            inputs.json_file: gr.update(value=str(result.downloads["json"]), visible=True),
            inputs.csv_file: gr.update(value=str(result.downloads["csv"]), visible=True)}
    if is_cell:
        return page | {r.cell_image: result.crops[0], r.cell_caption: cell_markdown(report, schema, low),
                       r.cell_attributes: styled(review.cell_table(report.cells[0], schema, low))}
    return page | {r.overlay: result.overlay, r.differential: styled(review.differential_table(report)),
                   r.gallery: gallery_items(result), r.captions: captions_markdown(report, schema, low),
                   r.cells_table: styled(review.attribute_table(report, schema, low))}


def run_review(reviewer: Reviewer, file: str | None, kind: str, red_cell_px: float | None) -> Review:
    """``reviewer.analyse`` with every problem turned into one plain sentence for the page: the file's
    name (the uploader's own), never a server path nor a library's words (those go to the log)."""
    if not file:
        raise gr.Error(NO_IMAGE)
    name = html.escape(Path(file).name)
    try:
        return reviewer.analyse(file, kind, red_cell_px)
    except ImageError as error:
        log.info("unusable upload: %s", error)
        raise gr.Error(UNREADABLE.format(name=name, reason=html.escape(error.plain)), print_exception=False) from None
    except Exception:  # noqa: BLE001 - the page gets one sentence, the log the traceback
        log.exception("analysis failed on an uploaded image")
        raise gr.Error(FAILED.format(name=name), print_exception=False) from None


class OnePerClient:
    """Admits at most one analysis per client until it finishes (``release``): a client cannot fill the
    queue ahead of the others. An admission not released within ``hold_s`` (an event dropped before it
    ran) lapses, so a client is never shut out for good."""

    def __init__(self, hold_s: float = CLIENT_HOLD_S):
        self.hold_s = hold_s
        self._since: dict[str, float] = {}
        self._lock = threading.Lock()

    def admit(self, client: str) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._since.get(client, -self.hold_s) < self.hold_s:
                return False
            self._since[client] = now
            return True

    def release(self, client: str) -> None:
        with self._lock:
            self._since.pop(client, None)


def client_key(request: gr.Request | None) -> str:
    """Who asks: the address; on this machine's own address (a local user, or gradio's share tunnel,
    through which every remote visitor arrives) the browser session too."""
    if request is None or request.client is None:  # called from Python, not through the page
        return "local"
    host = request.client.host
    return f"{host} {request.session_hash}" if is_loopback(host) else host


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


# ------------------------------------------------------------------------------ start


class PrivateFolder:
    """This server's folder (mode 0700, ``mkdtemp``) for gradio's uploads and pictures (``GRADIO_TEMP_DIR``,
    read by every gradio component and by the server when they are created) and for the reports.

    Gradio's default, ``/tmp/gradio``, is shared by every user of the machine (0755 folders, 0644
    files), and another user could create it first. Make it before ``build_app``; ``remove`` deletes it
    and points ``GRADIO_TEMP_DIR`` back where it was."""

    def __init__(self):
        self._folder = tempfile.TemporaryDirectory(prefix="hemcap-demo-")
        self.path = Path(self._folder.name)
        self.reports = self.path / "reports"
        self._before = os.environ.get("GRADIO_TEMP_DIR")
        os.environ["GRADIO_TEMP_DIR"] = str(self.path / "gradio")

    def remove(self) -> None:
        if self._before is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = self._before
        self._folder.cleanup()


def read_logins(path: str | Path) -> list[tuple[str, str]]:
    """``(user, password)`` from a file of ``user:password`` lines (blank lines and ``#`` comments
    skipped). Errors name the line, never its text: it may hold a password."""
    path = Path(path)
    logins = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, colon, password = line.partition(":")
        if not (user and colon and password):
            raise ValueError(f"{path}, line {number}: expected user:password (the line is not shown)")
        logins.append((user, password))
    if not logins:
        raise ValueError(f"{path}: no user:password line")
    if path.stat().st_mode & 0o077:
        log.warning("%s can be read by other users of this machine: chmod 600 it", path)
    return logins


def logins_for(host: str, share: bool, auth_file: str | Path | None) -> list[tuple[str, str]] | None:
    """The logins the page asks for: ``auth_file``'s; none on 127.0.0.1 without one; a page reachable
    from other machines (``share``, another ``host``) without them is refused (PermissionError)."""
    if auth_file:
        return read_logins(auth_file)
    refuse_exposure(host, share, None)
    return None


def refuse_exposure(host: str, share: bool, auth) -> None:
    if auth or (is_loopback(host) and not share):
        return
    where = "--share" if share else f"--host {host}"
    raise PermissionError(EXPOSED.format(where=where))


def load_reviewer(model_dir: str | Path, workdir: str | Path, device: str | None = None,
                  detector_dir: str | Path | None = None) -> Reviewer:
    from hemcap.engine import CaptionEngine

    detector = build_detector(detector_dir=detector_dir)
    reviewer = Reviewer(CaptionEngine.from_dir(model_dir, device=device), review.summarize_model(model_dir), workdir,
                        detector=detector)
    reviewer.warm_up()
    return reviewer


def launch(model_dir: str | Path, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           block: bool = True, device: str | None = None, detector_dir: str | Path | None = None,
           auth: list[tuple[str, str]] | None = None) -> gr.Blocks:
    """Load the model once and serve the page; with ``block``, until Ctrl+C or SIGTERM, then remove its
    private folder (without ``block``, the folder goes when the process exits)."""
    refuse_exposure(host, share, auth)  # before the model loads (serve checks again)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own start-up requests, one line each
    folder = PrivateFolder()
    try:
        app = serve(build_app(load_reviewer(model_dir, folder.reports, device, detector_dir)), host, port, share, auth)
        app.private_folder = folder
        print(f"hemcap demo: open {app.local_url}" + (f" or {app.share_url}" if app.share_url else "")
              + f" (Ctrl+C stops it); its uploads and reports are in {folder.path}", flush=True)
        if block:
            wait(app)
    finally:
        if block:
            folder.remove()
    return app


def wait(app: gr.Blocks) -> None:
    """Serve until Ctrl+C or SIGTERM (``kill``, a service manager): both end in gradio's shutdown."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():  # Python sets handlers there only
        signal.signal(signal.SIGTERM, interrupt)
    app.block_thread()


def serve(app: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
          auth: list[tuple[str, str]] | None = None) -> gr.Blocks:
    """Start serving a built page with the safe settings of the module docstring; returns at once."""
    refuse_exposure(host, share, auth)
    app.queue(default_concurrency_limit=1, max_size=32)  # one image at a time: the model is shared
    try:
        app.launch(server_name=host, server_port=port, share=share, auth=auth, max_file_size=MAX_UPLOAD,
                   show_error=False, footer_links=[], run_history=False, enable_monitoring=False, ssr_mode=False,
                   mcp_server=False, allowed_paths=[str(EXAMPLES_DIR)], prevent_thread_lock=True, theme=THEME,
                   css=CSS, quiet=True)
    except OSError as error:  # gradio: "Cannot find empty port in range: ..."
        raise OSError(f"cannot serve on {host}:{port}: the port is taken or the address is not this machine's; "
                      "pass another --port or --host") from error
    return app
