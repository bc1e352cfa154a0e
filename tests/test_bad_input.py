"""Every kind of bad input we know of, run through the real CLI (`python cli.py ...` in a
subprocess): each must end with exit code != 0, no traceback, and exactly one `error:` line that
names the file, key or value at fault.

The same cases write the README's "Bad input" table, so its messages are the real ones:

    .venv/bin/python tests/test_bad_input.py          # rewrites the table in README.md

and `test_the_readme_table_is_the_real_output` fails when the table and the outputs part.
Commands run in a scratch folder with relative paths, so the messages are the same on every machine.
Cases that need a trained model share one, trained once (2 iterations on a 4-image COCO set).
The cases' processes run side by side, one per core (`run_cases`): each costs seconds of start-up
and imports, and one after another they took minutes. Each case is still its own test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from conftest import write_tiny_coco  # noqa: E402

README = REPO / "README.md"
START, END = "<!-- bad-input:start -->", "<!-- bad-input:end -->"
SECRET = "s3cret"  # the password of the URLs below: it must never be printed
DEAD_SERVER = f"http://ablate:{SECRET}@127.0.0.1:9"  # nothing listens on port 9 (discard)


@dataclass
class Case:
    """One bad input: the command, the text its one error line must hold, and what else to check."""

    id: str
    kind: str  # the README's description
    args: list[str]
    needles: tuple[str, ...]
    cwd: str = "."  # relative to the scratch folder
    env: dict[str, str] = field(default_factory=dict)
    exit_code: int = 1
    only_line: bool = True  # the error line is the whole output
    needs_model: bool = False
    # The folder (relative to the scratch folder) the command writes into, or whose contents its
    # outcome depends on. Cases naming the same folder run one after another, in CASES order, as
    # they did when every case ran alone; the others run at once. Found by listing the files each
    # case left behind; a new case that writes must say where.
    writes: str | None = None


TRAIN = ["train", "smoke", "--no-progress"]

CASES = [
    # --- seeds
    Case("seed-negative", "negative seed", [*TRAIN, "--seed", "-1"], ("--seed", "train.seed", "-1")),
    Case("seed-too-big", "seed >= 2**32", [*TRAIN, "--seed", "4294967296"], ("train.seed", "4294967296")),
    Case("seeds-toml-negative", "negative seed in a file's `seeds`", ["train", "seed-neg.toml"],
         ("seed-neg.toml", "'seeds'", "-1")),
    Case("seeds-toml-empty", "empty `seeds`", ["train", "seeds-empty.toml"], ("seeds-empty.toml", "'seeds'")),
    Case("seeds-count-negative", "`--seeds -3`", ["run", "smoke", "--seeds", "-3"], ("--seeds", "-3")),
    Case("seeds-count-zero", "`--seeds 0` (show)", ["show", "smoke", "--seeds", "0"], ("--seeds", "0")),
    Case("set-seed-negative", "negative seed by --set", [*TRAIN, "--set", "train.seed=-5"], ("train.seed", "-5")),
    # --- rich markup in names, values and paths
    Case("markup-name", "markup in an experiment name", ["train", "[/bold]"], ("'[/bold]'",)),
    Case("markup-value", "markup in a --set value", [*TRAIN, "--set", "loss.cls=[/red]"], ("loss.cls", "'[/red]'")),
    Case("markup-path", "markup in a data path", [*TRAIN, "--data", "coco:[red]nowhere"], ("[red]nowhere",)),
    Case("markup-key", "markup in a --set key", [*TRAIN, "--set", "[bold]x=1"], ("'[bold]x'",)),
    Case("nan-value", "NaN value", [*TRAIN, "--set", "loss.gamma=NaN"], ("loss.gamma", "nan")),
    Case("bbox-brackets", "a bbox that is not [x, y, w, h]", [*TRAIN, "--data", "coco:badbox"],
         ("instances_train2017.json", "[x, y, w, h]")),
    # --- config values
    Case("unknown-key", "unknown config key", [*TRAIN, "--set", "loss.gama=1"], ("loss.gama", "loss.gamma")),
    Case("wrong-type", "value of the wrong type", [*TRAIN, "--set", "train.iterations=many"],
         ("train.iterations", "many")),
    Case("set-no-equals", "--set without =", [*TRAIN, "--set", "loss.gamma"], ("--set", "loss.gamma")),
    Case("bad-choice", "value not among the choices", [*TRAIN, "--set", "loss.box=l3"], ("loss.box", "l3")),
    Case("alpha-range", "alpha outside [0, 1]", [*TRAIN, "--set", "loss.alpha=1.5"], ("loss.alpha",)),
    Case("head-channels-3", "`model.head_channels=3` (GroupNorm)", [*TRAIN, "--set", "model.head_channels=3"],
         ("model.head_channels", "3")),
    Case("head-channels-18", "head channels GroupNorm cannot split", [*TRAIN, "--set", "model.head_channels=18"],
         ("model.head_channels", "18")),
    Case("device", "`train.device=foo`", [*TRAIN, "--set", "train.device=foo"], ("train.device", "foo")),
    Case("min-size-0", "`data.min_size=0`", [*TRAIN, "--set", "data.min_size=0"], ("data.min_size", "0")),
    Case("max-size-negative", "negative `data.max_size`", [*TRAIN, "--set", "data.max_size=-5"],
         ("data.max_size", "-5")),
    Case("max-train-images", "negative `data.max_train_images`", [*TRAIN, "--set", "data.max_train_images=-1"],
         ("data.max_train_images", "-1")),
    Case("warmup-negative", "negative `train.warmup_iters`", [*TRAIN, "--set", "train.warmup_iters=-1"],
         ("train.warmup_iters", "-1")),
    Case("synth-size", "`synth.image_size=0`", ["data", "synth", "--no-progress", "--set", "synth.image_size=0"],
         ("synth.image_size",)),
    Case("num-scales-0", "no anchor scale", [*TRAIN, "--set", "model.num_scales=0"], ("model.num_scales",)),
    Case("batch-0", "batch size 0", [*TRAIN, "--set", "train.batch_size=0"], ("train.batch_size",)),
    Case("bad-preset", "unknown --preset", ["run", "smoke", "--preset", "huge"], ("--preset", "huge")),
    Case("bad-data-option", "--data neither synth nor coco:PATH", [*TRAIN, "--data", "imagenet"],
         ("--data", "imagenet")),
    # --- experiment files
    Case("unknown-experiment", "unknown experiment", ["train", "no-such-experiment"], ("no-such-experiment",)),
    Case("non-utf8", "experiment file not UTF-8", ["train", "latin1.toml"], ("latin1.toml", "UTF-8")),
    Case("malformed-toml", "malformed TOML", ["train", "malformed.toml"], ("malformed.toml", "TOML")),
    Case("unknown-top-key", "unknown key in a file", ["train", "unknown-key.toml"], ("unknown-key.toml", "grids")),
    Case("paper-table", "bad `report.paper_table`", ["show", "paper-table.toml"],
         ("paper-table.toml", "report.paper_table", "z")),
    Case("baseline", "`baseline` naming no cell", ["show", "baseline.toml"], ("baseline.toml", "baseline", "nope")),
    Case("list-bad-file", "one bad file in ./experiments (`ablate list`: the others are listed)", ["list"],
         ("broken.toml", "loss.cls"), cwd="listing", only_line=False),
    # --- data
    Case("images-empty", "`images: []`", [*TRAIN, "--data", "coco:noimages"],
         ("noimages/annotations/instances_train2017.json", "'images'")),
    Case("categories-empty", "`categories: []`", [*TRAIN, "--data", "coco:nocats"],
         ("nocats/annotations/instances_train2017.json", "'categories'")),
    Case("data-missing", "missing data folder", [*TRAIN, "--data", "coco:nowhere"], ("nowhere",)),
    Case("json-truncated", "truncated annotation JSON", [*TRAIN, "--data", "coco:truncated"],
         ("truncated/annotations/instances_train2017.json",)),
    # --- output folders
    Case("train-out-file", "train `--out` naming a file", [*TRAIN, "--out", "afile"], ("--out", "afile")),
    Case("out-dir-file", "`train.out_dir` under a file", [*TRAIN, "--set", "train.out_dir=afile/runs"],
         ("train.out_dir", "afile")),
    # --- checkpoints
    Case("ckpt-missing", "missing checkpoint", ["eval", "nothing.pt", "--no-progress"], ("nothing.pt",)),
    Case("ckpt-not-one", "a file that is no checkpoint", ["eval", "afile", "--no-progress"],
         ("afile", "not an ablate checkpoint")),
    Case("ckpt-model-mismatch", "checkpoint that does not fit the model (`--set model.num_scales=2`)",
         ["eval", "model.pt", "--no-progress", "--set", "model.num_scales=2"], ("model.pt", "cls_subnet"),
         needs_model=True),
    Case("ckpt-no-classes", "checkpoint without class names", ["eval", "noclass.pt", "--no-progress"],
         ("noclass.pt", "class_names"), needs_model=True),
    Case("ckpt-other-categories", "val set with other categories", ["eval", "model.pt", "--no-progress",
                                                                    "--data", "coco:othercats"],
         ("model.pt", "'cow'"), needs_model=True),
    Case("eval-out-file", "eval `--out` naming a file", ["eval", "model.pt", "--no-progress", "--out", "afile"],
         ("--out", "afile"), needs_model=True),
    Case("infer-out-file", "infer `--out` naming a file", ["infer", "model.pt", "in.png", "--out", "afile"],
         ("--out", "afile"), needs_model=True),
    Case("infer-overwrite-input", "infer `--out` in the input's folder", ["infer", "model.pt", "in.png", "--out", "."],
         ("in.png", "overwrite"), needs_model=True),
    Case("infer-same-stem", "two inputs with the same stem", ["infer", "model.pt", "a/img.png", "b/img.jpg",
                                                              "--out", "drawn"],
         ("a/img.png", "b/img.jpg", "drawn/img.png"), needs_model=True, writes="drawn"),
    Case("infer-missing-image", "missing input image", ["infer", "model.pt", "nothere.png", "--out", "drawn"],
         ("nothere.png",), needs_model=True, writes="drawn"),
    Case("infer-not-image", "input that is no image", ["infer", "model.pt", "notimage.png", "--out", "drawn"],
         ("notimage.png",), needs_model=True, writes="drawn"),  # creates drawn/
    Case("loss-cdf-out-file", "loss-cdf `--out` naming a file", ["analyze", "loss-cdf", "model.pt", "--out", "afile"],
         ("--out", "afile"), needs_model=True),
    Case("findings-reports-file", "findings `--reports` naming a file", ["findings", "--reports", "afile"],
         ("--reports", "afile")),
    Case("gammas", "`--gammas` not numbers", ["analyze", "loss-cdf", "model.pt", "--gammas", "a,b"],
         ("--gammas", "a,b")),
    # --- tracking store and queue
    Case("server-show", "unreachable tracking server (show)", ["show", "smoke"], ("tracking store", "127.0.0.1:9"),
         env={"MLFLOW_TRACKING_URI": DEAD_SERVER}),
    Case("server-run", "unreachable tracking server (run)", ["run", "smoke", "--no-progress"],
         ("tracking store", "127.0.0.1:9"), env={"MLFLOW_TRACKING_URI": DEAD_SERVER}),
    Case("server-report", "unreachable tracking server (report)", ["report", "smoke"],
         ("tracking store", "127.0.0.1:9"), env={"MLFLOW_TRACKING_URI": DEAD_SERVER}),
    Case("server-ui", "unreachable tracking server (ui)", ["ui"], ("tracking store", "127.0.0.1:9"),
         env={"MLFLOW_TRACKING_URI": DEAD_SERVER}),
    Case("store-under-file", "sqlite store under a file", ["show", "smoke"], ("tracking store", "afile"),
         env={"MLFLOW_TRACKING_URI": "sqlite:///afile/mlflow.db"}),
    Case("artifacts-file", "./mlartifacts is a file (checked before training)", ["run", "smoke", "--no-progress"],
         ("artifact store", "mlartifacts"), cwd="artifacts-file", writes="artifacts-file"),
    Case("queue-folder-file", "./.ablate is a file", ["run", "smoke", "--no-progress"], ("queue folder", ".ablate"),
         cwd="queue-file", writes="queue-file"),
    Case("queue-unreachable", "unreachable queue server",
         ["run", "smoke", "--storage", f"postgresql://ablate:{SECRET}@127.0.0.1:9/queue"], ("--storage", "127.0.0.1:9")),
    Case("grid-out-dir-file", "a grid's `train.out_dir` under a file (checked before any cell)",
         ["run", "smoke", "--no-progress", "--set", "train.out_dir=../afile/runs"], ("train.out_dir", "afile"),
         cwd="grid-out", only_line=False, writes="grid-out"),
    Case("checkpoint-every", "negative `--checkpoint-every`", ["run", "smoke", "--checkpoint-every", "-1"],
         ("--checkpoint-every",)),
    # --- a grid whose cell fails: the grid goes on, and the reason is printed, not only stored
    Case("grid-cell-fails", "a grid cell that fails (a corrupt image)", ["run", "../fail-cell.toml", "--no-progress"],
         ("fail-cell", "failed", "000000000001.png"), cwd="grid", exit_code=4, only_line=False, writes="grid"),
]


# ----------------------------------------------------------------------------- the scratch folder


def make_workspace(root: Path) -> Path:
    """Every file the cases name, under `root`."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    (root / "afile").write_text("a file where a folder or checkpoint is expected\n")
    files = {
        "seed-neg.toml": 'preset = "tiny"\nseeds = [-1]\n',
        "seeds-empty.toml": 'preset = "tiny"\nseeds = []\n',
        "malformed.toml": 'preset = "tiny"\nseeds = [0\n',
        "unknown-key.toml": 'preset = "tiny"\ngrids = 3\n',
        "paper-table.toml": 'preset = "tiny"\n[report]\npaper_table = "z"\n',
        "baseline.toml": 'preset = "tiny"\nbaseline = "nope"\n[grid]\n"loss.gamma" = [1.0, 2.0]\n',
        "listing/experiments/broken.toml": 'preset = "tiny"\n[config]\nloss.cls = 3\n',
        "listing/experiments/fine.toml": 'description = "a [bracketed] description"\npreset = "tiny"\n',
        "artifacts-file/mlartifacts": "not a folder\n",
        "queue-file/.ablate": "not a folder\n",
        "fail-cell.toml": ('preset = "tiny"\ndata = "coco:../corrupt"\n[config]\ntrain.iterations = 2\n'
                           'train.batch_size = 2\ndata.min_size = 64\ndata.max_size = 64\n'),
        "notimage.png": "not an image\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "latin1.toml").write_bytes('description = "caf\u00e9"\npreset = "tiny"\n'.encode("latin-1"))
    (root / "grid").mkdir(exist_ok=True)
    (root / "grid-out").mkdir(exist_ok=True)
    for name in ("tiny", "noimages", "nocats", "othercats", "truncated", "badbox", "corrupt"):
        write_tiny_coco(root / name)
    _edit_annotations(root / "noimages", "train", lambda d: d.update(images=[], annotations=[]))
    _edit_annotations(root / "nocats", "train", lambda d: d.update(categories=[], annotations=[]))
    _edit_annotations(root / "othercats", "val", lambda d: d["categories"][1].update(name="cow"))
    _edit_annotations(root / "badbox", "train", lambda d: d["annotations"][0].update(bbox=[1, 2, 3]))
    ann = root / "truncated" / "annotations" / "instances_train2017.json"
    ann.write_text(ann.read_text()[:-20])
    (root / "corrupt" / "train2017" / "000000000001.png").write_bytes(b"not an image at all")
    Image.new("RGB", (64, 48), (40, 90, 160)).save(root / "in.png")
    for folder, name in (("a", "img.png"), ("b", "img.jpg")):
        (root / folder).mkdir(exist_ok=True)
        Image.new("RGB", (64, 48), (90, 40, 160)).save(root / folder / name)
    return root


def _edit_annotations(root: Path, split: str, edit) -> None:
    path = root / "annotations" / f"instances_{split}2017.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def train_model(root: Path) -> None:
    """model.pt (2 iterations on the tiny COCO set) and noclass.pt, the same without class names."""
    out = root / "model-run"
    result = run_cli(["train", "smoke", "--no-progress", "--data", "coco:tiny", "--out", "model-run",
                      "--set", "train.iterations=2", "--set", "train.batch_size=2",
                      "--set", "data.min_size=64", "--set", "data.max_size=64"], root)
    assert result.returncode == 0, result.stderr
    (run_dir,) = out.iterdir()
    (root / "model.pt").write_bytes((run_dir / "checkpoint.pt").read_bytes())
    import torch

    ckpt = torch.load(root / "model.pt", weights_only=True)
    del ckpt["class_names"]
    torch.save(ckpt, root / "noclass.pt")


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "ABLATE_STORAGE")}
    environ.update(PYTHONPATH=str(REPO), COLUMNS="200", **(env or {}))
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *args], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=300)


@dataclass
class Outcome:
    """What one case's command did: the finished process and its wall seconds."""

    result: subprocess.CompletedProcess
    seconds: float


def run_case(case: Case, root: Path) -> Outcome:
    t0 = time.monotonic()
    result = run_cli(case.args, root / case.cwd, case.env)
    return Outcome(result, time.monotonic() - t0)


def run_cases(cases: list[Case], root: Path) -> dict[str, Outcome | Exception]:
    """Run `cases` in the scratch folder `root` (make_workspace's), as many at once as the machine
    has cores; case id -> its Outcome, or the exception that kept it from one (its test raises it,
    the other cases go on).

    The model is trained in the pool beside the cases that do not need it (none of those reads
    model-run/, model.pt or noclass.pt); the cases that need it start once it is written."""
    outcomes: dict[str, Outcome | Exception] = {}
    chains: dict[tuple[str, str], list[Case]] = {}  # cases writing one folder: one chain, run in order
    for case in cases:
        chains.setdefault(("writes", case.writes) if case.writes else ("case", case.id), []).append(case)

    def run_chain(chain: list[Case], trained) -> None:
        for case in chain:
            try:
                if case.needs_model:
                    trained.result()  # the training's own error, if it failed, is this case's
                outcomes[case.id] = run_case(case, root)
            except Exception as e:  # noqa: BLE001 (reported by the case's test)
                outcomes[case.id] = e

    # The threads only wait on their subprocesses: one per core keeps every core busy.
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        trained = pool.submit(train_model, root) if any(c.needs_model for c in cases) else None
        # Submitted in this order and started first come, first served: the chains that need the model
        # start after every other one, by when the training (submitted first) is long done.
        ordered = sorted(chains.values(), key=lambda chain: any(c.needs_model for c in chain))
        try:
            for future in [pool.submit(run_chain, chain, trained) for chain in ordered]:
                future.result()
        except BaseException:  # Ctrl-C: the cases not yet started never start
            pool.shutdown(cancel_futures=True)
            raise

    return outcomes


# ----------------------------------------------------------------------------- the checks


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error:")]


def check(case: Case, result: subprocess.CompletedProcess, seconds: float) -> str:
    """Assert the case's contract; returns its error message (without 'error: '). `seconds` is only
    shown: a busy machine stretches it (how long a server is waited for is set in the code, and
    tested there: tests/test_tracking.py, tests/test_scheduling.py)."""
    output = result.stdout + result.stderr
    assert result.returncode == case.exit_code, f"{output}\n(after {seconds:.1f} s)"
    assert "Traceback" not in output, output
    errors = error_lines(result)
    assert len(errors) == 1, output
    if case.only_line:
        assert [line for line in output.splitlines() if line.strip()] == errors, output
    for needle in case.needles:
        assert needle in errors[0], errors[0]
    assert SECRET not in output, output
    return errors[0][len("error: "):]


MESSAGES: dict[str, str] = {}  # case id -> message, filled by the tests, read by the README check


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("bad-input"))


def checked(case: Case, outcome: Outcome | Exception) -> str:
    """`check` of a case's outcome from run_cases (re-raising what kept it from running)."""
    if isinstance(outcome, Exception):
        raise outcome
    return check(case, outcome.result, outcome.seconds)


def _case_of(item: pytest.Item) -> Case | None:
    callspec = getattr(item, "callspec", None)
    case = callspec.params.get("case") if callspec else None
    return case if isinstance(case, Case) else None


@pytest.fixture(scope="module")
def outcomes(request, workspace: Path) -> dict[str, Outcome | Exception]:
    """The cases of this session's tests (all, or those -k picked), run at once before the first
    test checks its own; the model is trained only if one of them needs it."""
    cases = [case for case in map(_case_of, request.session.items) if case is not None]
    with pytest.MonkeyPatch.context() as mp:
        # conftest's one_worker_by_default is set per test, after module fixtures like this one: set here
        # too, so the grid cases run their cells in their own process as they did inside their tests.
        mp.setenv("ABLATE_JOBS", "1")
        return run_cases(cases, workspace)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line(case: Case, outcomes: dict[str, Outcome | Exception]):
    MESSAGES[case.id] = checked(case, outcomes[case.id])


def test_list_still_lists_the_good_experiments(workspace: Path):
    """Beside the bad file's error line: every other experiment, brackets in its text kept."""
    result = run_cli(["list"], workspace / "listing")
    assert result.returncode == 1
    for name in ("broken", "fine", "smoke", "a [bracketed] description"):
        assert name in result.stdout, result.stdout


def test_grid_failure_leaves_the_grid_recorded(workspace: Path):
    """The failed cell is also recorded in the store, with the same reason (the run above)."""
    if "grid-cell-fails" not in MESSAGES:
        pytest.fail("run the grid-cell-fails case first (it is in this file)")
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workspace / 'grid' / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "fail-cell"]
    (run,) = client.search_runs([experiment.experiment_id], filter_string="tags.`ablate.outcome` = 'failed'")
    assert run.data.tags["ablate.error"] in MESSAGES["grid-cell-fails"]


def test_two_fresh_stores_at_once(tmp_path: Path):
    """Three processes opening one fresh sqlite store at once (two `ablate run` in a new folder):
    MLflow's schema migration raced and one failed; the lock file makes the others wait."""
    code = "import sys; from ablate.tracking import init_store; init_store(sys.argv[1]); print('ok')"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", code, uri], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert all(out.strip() == "ok" for out, _ in outputs), outputs


def test_credentials_are_masked_in_mlflow_logs():
    """MLflow's own log lines (retries quote the request URL) pass through the mask, and its
    'View run at URL' lines are switched off."""
    import logging

    import ablate.tracking  # noqa: F401  (installs the mask)

    record = logging.getLogger("mlflow.utils.rest_utils").makeRecord(
        "mlflow.utils.rest_utils", logging.WARNING, __file__, 1, "retrying %s", (f"{DEAD_SERVER}/api",), None)
    assert SECRET not in record.getMessage() and "ablate:***@127.0.0.1:9/api" in record.getMessage()
    assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"


# ----------------------------------------------------------------------------- the README table


def readme_table(messages: dict[str, str]) -> str:
    """The Markdown table of the cases in `messages`, in CASES order."""
    rows = ["| # | bad input | command | exit | the one line it prints |", "|---:|:---|:---|---:|:---|"]
    for i, case in enumerate((c for c in CASES if c.id in messages), 1):
        env = "".join(f"{k}={v} " for k, v in case.env.items())
        where = f"(in {case.cwd}/) " if case.cwd != "." else ""
        command = f"{where}{env}ablate {' '.join(_quote(a) for a in case.args)}"
        rows.append(f"| {i} | {case.kind} | `{command}` | {case.exit_code} | {_cell(messages[case.id])} |")
    return "\n".join(rows) + "\n"


def _quote(arg: str) -> str:
    return f"'{arg}'" if re.search(r"[\s\[\]]", arg) or arg == "" else arg


def _cell(message: str) -> str:
    """A message as a table cell: object addresses vary from run to run; pipes would split the cell."""
    return re.sub(r"0x[0-9a-f]{6,}", "0x...", message).replace("|", "\\|")


def readme_rows() -> dict[str, str]:
    """The README table's rows, by the command column (the table between the markers)."""
    text = README.read_text()
    block = text[text.index(START) + len(START):text.index(END)]
    return {line.split(" | ")[2]: line for line in block.strip().splitlines()[2:]}


def test_the_readme_table_is_the_real_output():
    """Every case that ran in this session has its row in README.md, with the message it printed."""
    assert MESSAGES, "no case ran"
    assert len(CASES) >= 40
    documented = readme_rows()
    for line in readme_table(MESSAGES).splitlines()[2:]:
        command = line.split(" | ")[2]
        assert command in documented, f"README.md has no row for {command}; run python tests/test_bad_input.py"
        expected = documented[command].split(" | ", 1)[1]
        assert line.split(" | ", 1)[1] == expected, "README.md's row differs; run python tests/test_bad_input.py"


def write_readme_table() -> None:
    """Run every case (as the tests do, at once) and put their table between the README's markers."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("ABLATE_CACHE", str(Path(tmp) / "cache"))
        root = make_workspace(Path(tmp) / "work")
        outcomes = run_cases(CASES, root)
        messages = {}
        for case in CASES:
            messages[case.id] = checked(case, outcomes[case.id])
            print(f"{case.id}: {messages[case.id]}")
    text = README.read_text()
    head, tail = text[:text.index(START) + len(START)], text[text.index(END):]
    README.write_text(f"{head}\n{readme_table(messages)}{tail}")


if __name__ == "__main__":
    write_readme_table()
