"""Blind human review of base vs fine-tuned answers, and its summary.

`gemma4-keras review --workdir=RUN` serves one page on 127.0.0.1 that shows,
for each row of `RUN/eval/predictions.jsonl` (written by `gemma4-keras
evaluate`), the prompt, the reference and the two answers as A and B in an
order drawn at random per item. The reviewer picks "A better", "B better",
"tie" or "both bad" (keys A, B, T, X) with an optional comment; the page
resumes at the first item not yet judged.

Files, all inside `RUN/eval/` (the server writes nowhere else):

| file                 | content                                                |
|----------------------|--------------------------------------------------------|
| `human_review.jsonl` | one judgement per line, appended and fsynced as made   |
| `review_order.json`  | {item id: model shown as A}, drawn once, kept for good |
| `eval_report.md`     | gains a "## Human review" section (`--summary`)        |

A judgement line records the item, what the reviewer saw (`choice`: A, B,
tie, both_bad), which model was A and B, and the `verdict` in model terms
(`finetuned`, `base`, `tie`, `both_bad`). An item judged again gets a new
line; the last line of an item is the one that counts. The page sends with
each judgement how many lines its item had when the page showed it: a tab
left open while another tab (or reviewer) judged the item is refused (HTTP
409) and told to reload, so it never silently overwrites that judgement. Item ids hash the
prompt, reference and both answers, so judgements of an earlier evaluation
(other answers) no longer count after `evaluate` is rerun.

Example:

>>> [round(x, 4) for x in wilson_interval(8, 10)]
[0.4902, 0.9433]
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import http.server
import importlib.resources
import ipaddress
import json
import logging
import math
import os
import pathlib
import random
import re
import socket
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from gemma4_keras import atomic
from gemma4_keras.eval import metrics as metrics_lib

_LOG = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
REVIEW_LOG = "human_review.jsonl"
ORDER_FILE = "review_order.json"
REPORT_MD = "eval_report.md"
SECTION_TITLE = "## Human review"

BASE, FINETUNED = metrics_lib.BASE, metrics_lib.FINETUNED
TIE, BOTH_BAD = "tie", "both_bad"
CHOICES = ("A", "B", TIE, BOTH_BAD)  # what the reviewer sees
_VERDICTS = (FINETUNED, BASE, TIE, BOTH_BAD)  # what the log and summary count
MAX_COMMENT = 2000  # characters
MAX_BODY = 64 * 1024  # bytes of one POST
Z_95 = 1.959963984540054  # two-sided 95% normal quantile

_STATIC = {
    "/": ("review.html", "text/html; charset=utf-8"),
    "/review.js": ("review.js", "text/javascript; charset=utf-8"),
    "/review.css": ("review.css", "text/css; charset=utf-8"),
}
# Only the page's own script and style run; inline script, inline event
# handlers and any other origin are refused even if escaping were to fail.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


class ReviewError(Exception):
    """A missing or malformed review input, or a refused judgement."""


# ----------------------------------------------------------------------------
# Items
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Item:
    """One held-out prompt with the base and fine-tuned answers."""

    id: str
    index: int
    prompt: str
    reference: str | None
    base: str
    finetuned: str
    groups: tuple[tuple[str, str], ...] = ()  # (dimension, value), e.g. label


def _item_id(row: Mapping[str, Any]) -> str:
    key = [row.get("prompt"), row.get("reference"), row.get("prediction_base")]
    key.append(row.get("prediction_finetuned"))
    text = json.dumps(key, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def task_type(eval_dir: str | os.PathLike, references: Sequence[str | None]) -> str:
    """The run's task type: `eval_report.json`'s, else inferred from references."""
    path = pathlib.Path(eval_dir) / "eval_report.json"
    with contextlib.suppress(OSError, ValueError, AttributeError):
        models = json.loads(path.read_text(encoding="utf-8"))["models"]
        for model_metrics in models.values():
            if model_metrics.get("task_type") in metrics_lib.TASK_TYPES:
                return model_metrics["task_type"]
    known = [r for r in references if isinstance(r, str)]
    return metrics_lib.infer_task_type(known) if known else "generation"


def _groups(row: Mapping[str, Any], task: str) -> tuple[tuple[str, str], ...]:
    """The breakdowns an item belongs to: its task type and label, if known."""
    groups = []
    if isinstance(row.get("task_type"), str):
        groups.append(("task type", row["task_type"]))
    if isinstance(row.get("label"), str):
        groups.append(("label", row["label"]))
    elif task == "classification" and isinstance(row.get("reference"), str):
        groups.append(("label", metrics_lib.normalize_answer(row["reference"])))
    return tuple(groups)


def _read_rows(path: pathlib.Path) -> list[dict]:
    if not path.is_file():
        raise ReviewError(
            f"{path} is missing: run `gemma4-keras evaluate --workdir=RUN` first "
            "(it writes the base and fine-tuned answers the review shows)"
        )
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ReviewError(f"{path}:{number}: not JSON ({e})") from None
        for key in ("prompt", "prediction_base", "prediction_finetuned"):
            if not isinstance(row.get(key), str):
                how = (
                    "rerun `gemma4-keras evaluate` with --config.eval.compare_base=True"
                    if key == "prediction_base"
                    else "rerun `gemma4-keras evaluate`"
                )
                raise ReviewError(f"{path}:{number}: no string {key!r}; {how}")
        rows.append(row)
    if not rows:
        raise ReviewError(f"{path} has no rows: rerun `gemma4-keras evaluate`")
    return rows


def load_items(eval_dir: str | os.PathLike) -> list[Item]:
    """Reads the items to review from `eval_dir/predictions.jsonl`.

    Args:
        eval_dir: a run's `eval/` directory.

    Returns:
        One `Item` per row, in file order.

    Raises:
        ReviewError: the file is missing, empty, not JSON or lacks an answer.

    Example:
        A row `{"prompt": "2+2?", "reference": "4", "prediction_base": "5",
        "prediction_finetuned": "4"}` becomes `Item(id="<16 hex>", index=0,
        prompt="2+2?", reference="4", base="5", finetuned="4")`.
    """
    rows = _read_rows(pathlib.Path(eval_dir) / PREDICTIONS)
    task = task_type(eval_dir, [row.get("reference") for row in rows])
    items, seen = [], {}
    for index, row in enumerate(rows):
        item_id = _item_id(row)
        seen[item_id] = seen.get(item_id, 0) + 1
        if seen[item_id] > 1:  # identical rows stay separate items
            item_id = f"{item_id}-{seen[item_id]}"
        reference = row.get("reference")
        items.append(
            Item(
                id=item_id,
                index=index,
                prompt=row["prompt"],
                reference=reference if isinstance(reference, str) else None,
                base=row["prediction_base"],
                finetuned=row["prediction_finetuned"],
                groups=_groups(row, task),
            )
        )
    return items


def load_order(
    eval_dir: str | os.PathLike, items: Sequence[Item], rng: random.Random | None = None
) -> dict[str, str]:
    """{item id: model shown as A}; new items are drawn and saved to the file.

    The order is drawn once per item (fair coin from `rng`, by default the
    operating system's randomness) and kept in `review_order.json`, so a
    restarted server shows an item the same way.
    """
    path = pathlib.Path(eval_dir) / ORDER_FILE
    order: dict[str, str] = {}
    if path.is_file():
        try:
            order = dict(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, TypeError) as e:
            raise ReviewError(
                f"{path} is not a JSON object ({e}); delete it to draw a new order"
            ) from None
    rng = rng or random.SystemRandom()
    missing = [item.id for item in items if order.get(item.id) not in (BASE, FINETUNED)]
    for item_id in missing:
        order[item_id] = rng.choice((BASE, FINETUNED))
    if missing:
        atomic.write_text(path, json.dumps(order, indent=1) + "\n")
    return order


# ----------------------------------------------------------------------------
# The judgement log
# ----------------------------------------------------------------------------


def read_judgements(path: str | os.PathLike) -> list[dict]:
    """The lines of `human_review.jsonl`; a torn or foreign line is skipped."""
    path = pathlib.Path(path)
    if not path.is_file():
        return []
    judgements = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("item"), str):
            judgements.append(record)
        elif line.strip():
            _LOG.warning("%s:%d: not a judgement, skipped", path, number)
    return judgements


def revisions(
    judgements: Sequence[Mapping[str, Any]], items: Sequence[Item]
) -> dict[str, int]:
    """{item id: how many judgements it has had}, 0 for items never judged."""
    counts = dict.fromkeys((item.id for item in items), 0)
    for record in judgements:
        if record["item"] in counts and record.get("verdict") in _VERDICTS:
            counts[record["item"]] += 1
    return counts


def latest_judgements(
    judgements: Sequence[Mapping[str, Any]], items: Sequence[Item]
) -> dict[str, Mapping[str, Any]]:
    """{item id: its last judgement}, for the items of `items` only."""
    ids = {item.id for item in items}
    latest = {}
    for record in judgements:
        if record["item"] in ids and record.get("verdict") in _VERDICTS:
            latest[record["item"]] = record
    return latest


def append_judgement(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Appends one JSON line with a single write, then flushes it to disk.

    A line torn by a crash mid-write is closed first, so it costs only
    itself (`read_judgements` skips it), never the next judgement.
    """
    line = json.dumps(record, ensure_ascii=False) + "\n"
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = "\n" + line
        os.write(fd, line.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def _verdict(choice: str, a_model: str) -> str:
    b_model = BASE if a_model == FINETUNED else FINETUNED
    return {"A": a_model, "B": b_model}.get(choice, choice)


def _choice(verdict: str, a_model: str) -> str:
    if verdict in (TIE, BOTH_BAD):
        return verdict
    return "A" if verdict == a_model else "B"


# ----------------------------------------------------------------------------
# The server
# ----------------------------------------------------------------------------


def client_allowed(address: str, allow_remote: bool) -> bool:
    """Whether a request from `address` is served.

    Only loopback clients (127.0.0.0/8, ::1, ::ffff:127.x) unless the
    server was started with an explicit `--host`.

    Example:
        >>> client_allowed("127.0.0.1", False), client_allowed("10.0.0.7", False)
        (True, False)
    """
    if allow_remote:
        return True
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


_LOCAL_NAMES = ("127.0.0.1", "localhost", "[::1]")


def host_allowed(host_header: str | None, port: int, allow_remote: bool) -> bool:
    """Whether the Host header names this loopback server (DNS rebinding guard)."""
    if allow_remote:
        return True
    return host_header in {f"{name}:{port}" for name in _LOCAL_NAMES}


class StaleJudgement(ReviewError):
    """A judgement made on a page that did not show the item's latest state."""


class ReviewApp:
    """The review state behind the server: items, order, the log."""

    def __init__(self, eval_dir: str | os.PathLike, rng: random.Random | None = None):
        self.eval_dir = pathlib.Path(eval_dir)
        self.items = load_items(self.eval_dir)
        self.by_id = {item.id: item for item in self.items}
        self.order = load_order(self.eval_dir, self.items, rng)
        self.log_path = self.eval_dir / REVIEW_LOG
        self._lock = threading.Lock()

    def state(self) -> dict:
        """The page's data: items (answers as A/B), earlier choices, resume point."""
        with self._lock:
            log = read_judgements(self.log_path)
        latest = latest_judgements(log, self.items)
        revision = revisions(log, self.items)
        rows = []
        for item in self.items:
            a_model = self.order[item.id]
            a, b = (
                (item.finetuned, item.base)
                if a_model == FINETUNED
                else (item.base, item.finetuned)
            )
            done = latest.get(item.id)
            rows.append(
                {
                    "id": item.id,
                    "prompt": item.prompt,
                    "reference": item.reference,
                    "a": a,
                    "b": b,
                    "choice": _choice(done["verdict"], a_model) if done else None,
                    "comment": done.get("comment", "") if done else "",
                    "revision": revision[item.id],
                }
            )
        resume = next((i for i, row in enumerate(rows) if not row["choice"]), len(rows))
        return {
            "items": rows,
            "resume": resume,
            "max_comment": MAX_COMMENT,
            "workdir": str(self.eval_dir.parent),
        }

    def judge(self, payload: Any) -> dict:
        """Validates and logs one judgement; raises ReviewError (HTTP 400)."""
        if not isinstance(payload, dict):
            raise ReviewError('the body must be a JSON object {"item", "choice"}')
        unknown = sorted(set(payload) - {"item", "choice", "comment", "seen"})
        if unknown:
            raise ReviewError(
                f"unknown fields {unknown}; send item, choice, comment, seen"
            )
        item_id = payload.get("item")
        item = self.by_id.get(item_id) if isinstance(item_id, str) else None
        if item is None:
            raise ReviewError(f"item {item_id!r} is not in {PREDICTIONS}")
        choice = payload.get("choice")
        if choice not in CHOICES:
            raise ReviewError(f"choice {choice!r} is not one of {list(CHOICES)}")
        comment = payload.get("comment", "")
        if not isinstance(comment, str) or len(comment) > MAX_COMMENT:
            raise ReviewError(
                f"comment must be a string of <= {MAX_COMMENT} characters"
            )
        seen = payload.get("seen")
        if seen is not None and (isinstance(seen, bool) or not isinstance(seen, int)):
            raise ReviewError(f"seen {seen!r} must be the item's revision (an integer)")
        a_model = self.order[item.id]
        record = {
            "item": item.id,
            "index": item.index,
            "choice": choice,
            "a": a_model,
            "b": BASE if a_model == FINETUNED else FINETUNED,
            "verdict": _verdict(choice, a_model),
            "comment": comment.strip(),
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        with self._lock:
            now = revisions(read_judgements(self.log_path), [item])[item.id]
            if seen is not None and seen != now:
                raise StaleJudgement(
                    f"item {item.index + 1} was judged elsewhere (another tab or "
                    "reviewer) since this page showed it; reload the page to see "
                    "that judgement, then judge again if you disagree"
                )
            append_judgement(self.log_path, record)
            log = read_judgements(self.log_path)
        return {
            "saved": item.id,
            "revision": now + 1,
            "judged": len(latest_judgements(log, self.items)),
            "total": len(self.items),
        }


def _static(name: str) -> bytes:
    return (importlib.resources.files("gemma4_keras") / "resources" / name).read_bytes()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    server_version = "gemma4-keras-review"
    sys_version = ""

    def _allowed(self) -> bool:
        server = self.server
        if not client_allowed(self.client_address[0], server.allow_remote):
            self._send_json(403, {"error": "only loopback clients (start with --host)"})
            return False
        port = server.server_address[1]
        if not host_allowed(self.headers.get("Host"), port, server.allow_remote):
            self._send_json(403, {"error": f"use http://127.0.0.1:{port}/"})
            return False
        return True

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", _CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, status: int, value: Any) -> None:
        body = json.dumps(value, ensure_ascii=False).encode("utf-8")
        self._send(status, body, "application/json; charset=utf-8")

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if not self._allowed():
            return
        path = self.path.split("?")[0]
        if path in _STATIC:
            name, content_type = _STATIC[path]
            self._send(200, _static(name), content_type)
        elif path == "/api/state":
            self._send_json(200, self.server.app.state())
        else:
            self._send_json(404, {"error": f"no page {path}"})

    def do_POST(self) -> None:  # noqa: N802
        if not self._allowed():
            return
        if self.path != "/api/judgement":
            self._send_json(404, {"error": f"no endpoint {self.path}"})
            return
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip()
        if content_type != "application/json":
            self._send_json(415, {"error": "send Content-Type: application/json"})
            return
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            self._send_json(411, {"error": "send a Content-Length header"})
            return
        if int(length) > MAX_BODY:
            self._send_json(413, {"error": f"body over {MAX_BODY} bytes"})
            return
        try:
            payload = json.loads(self.rfile.read(int(length)).decode("utf-8"))
            self._send_json(200, self.server.app.judge(payload))
        except StaleJudgement as e:
            self._send_json(409, {"error": str(e), "stale": True})
        except (ValueError, ReviewError) as e:  # JSONDecodeError is a ValueError
            self._send_json(400, {"error": str(e)})

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        _LOG.debug("review %s " + format, self.client_address[0], *args)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    app: ReviewApp
    allow_remote: bool


class _Server6(_Server):
    address_family = socket.AF_INET6


def make_server(
    eval_dir: str | os.PathLike, host: str | None = None, port: int = 0
) -> _Server:
    """A review server for `eval_dir` (not yet serving: call `serve_forever`).

    Args:
        eval_dir: a run's `eval/` directory with `predictions.jsonl`.
        host: address to bind; None binds 127.0.0.1 and serves loopback
            clients only. Given explicitly, any client that reaches it is
            served.
        port: TCP port; 0 picks a free one (read `server.server_address`).

    Returns:
        The server; `server.app` is its `ReviewApp`.

    Example:
        >>> server = make_server("runs/tiny/eval")  # doctest: +SKIP
        >>> threading.Thread(target=server.serve_forever).start()  # doctest: +SKIP
    """
    app = ReviewApp(eval_dir)
    server_class = _Server6 if host and ":" in host else _Server
    try:
        server = server_class((host or "127.0.0.1", port), _Handler)
    except OSError as e:
        raise ReviewError(
            f"--host={host or '127.0.0.1'} --port={port}: cannot listen ({e.strerror}); "
            "pick another --port (0 = any free port)"
        ) from None
    server.app = app
    server.allow_remote = host is not None
    return server


def serve(workdir: str | os.PathLike, host: str | None = None, port: int = 0) -> int:
    """`gemma4-keras review`: serves the page until Ctrl-C; returns 0."""
    server = make_server(pathlib.Path(workdir) / "eval", host, port)
    bound_host, bound_port = server.server_address[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    state = server.app.state()
    judged = sum(1 for row in state["items"] if row["choice"])
    print(
        f"review: open http://{shown}:{bound_port}/ ({len(state['items'])} items, "
        f"{judged} judged; Ctrl-C stops; judgements go to "
        f"{server.app.log_path})",
        flush=True,
    )
    if host is not None and not client_allowed(bound_host, False):
        print(
            f"review: --host={host}: any client that reaches it is served", flush=True
        )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    print(
        f"review: stopped; summary: gemma4-keras review --workdir={workdir} --summary"
    )
    return 0


# ----------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------


def wilson_interval(k: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion `k / n` (95% by default).

    Unlike the normal approximation it stays inside [0, 1] and is sensible
    for the small `n` and extreme rates of a human review.

    Example:
        >>> [round(x, 4) for x in wilson_interval(0, 4)]
        [0.0, 0.4899]
    """
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, center - half), min(1.0, center + half))


def _rate(k: int, n: int) -> dict:
    low, high = wilson_interval(k, n)
    return {"count": k, "rate": k / n if n else None, "ci95": [low, high]}


def _outcomes(verdicts: Sequence[str]) -> dict:
    """win / tie / both bad / loss of the fine-tuned model, with rates."""
    n = len(verdicts)
    names = {"win": FINETUNED, "tie": TIE, "both_bad": BOTH_BAD, "loss": BASE}
    result = {name: _rate(verdicts.count(v), n) for name, v in names.items()}
    return {"n": n, **result}


def _item_score(task: str, reference: str | None, answer: str) -> float | None:
    """The task's headline metric on one item; None without a reference."""
    if reference is None and task != "instruction":
        return None
    references = [reference if reference is not None else ""]
    result = metrics_lib.compute_metrics(task, references, [answer])
    return float(result[metrics_lib.headline_metric(task, result)])


def _agreement(items: Sequence[Item], latest: Mapping[str, Mapping], task: str) -> dict:
    """How often the reviewer prefers the answer the metric scores higher."""
    preferred, agree, undecided = 0, 0, 0
    for item in items:
        if item.id not in latest:
            continue
        base = _item_score(task, item.reference, item.base)
        tuned = _item_score(task, item.reference, item.finetuned)
        if base is None or tuned is None or base == tuned:
            continue
        preferred += 1
        metric_choice = FINETUNED if tuned > base else BASE
        verdict = latest[item.id]["verdict"]
        agree += verdict == metric_choice
        undecided += verdict in (TIE, BOTH_BAD)
    metric = metrics_lib.headline_metric(task)
    return {
        "metric": metric,
        "n": preferred,
        "undecided": undecided,
        **_rate(agree, preferred),
    }


def summarize(eval_dir: str | os.PathLike) -> dict:
    """Win / tie / loss of fine-tuned vs base from the human review of a run.

    Args:
        eval_dir: a run's `eval/` directory with `predictions.jsonl` and
            `human_review.jsonl`.

    Returns:
        {"items", "judged", "stale", "overall": outcomes, "groups":
        {dimension: {value: outcomes}}, "agreement": {...}}, where outcomes
        are {"n", "win", "tie", "both_bad", "loss"}, each {"count", "rate",
        "ci95": [low, high]} (95% Wilson interval), and "agreement" counts
        the judged items on which the task's headline metric prefers one
        answer (for accuracy / exact match: exactly one answer is correct)
        and how often the reviewer preferred the same one (a tie or "both
        bad" counts as not agreeing; `undecided` says how many).

    Raises:
        ReviewError: predictions.jsonl is unusable or nothing is judged.
    """
    eval_dir = pathlib.Path(eval_dir)
    items = load_items(eval_dir)
    judgements = read_judgements(eval_dir / REVIEW_LOG)
    latest = latest_judgements(judgements, items)
    if not latest:
        raise ReviewError(
            f"{eval_dir / REVIEW_LOG} has no judgement of the current predictions: "
            f"judge some first with `gemma4-keras review --workdir={eval_dir.parent}`"
        )
    judged = [item for item in items if item.id in latest]
    groups: dict[str, dict[str, list[str]]] = {}
    for item in judged:
        for dimension, value in item.groups:
            groups.setdefault(dimension, {}).setdefault(value, [])
            groups[dimension][value].append(latest[item.id]["verdict"])
    task = task_type(eval_dir, [item.reference for item in items])
    return {
        "items": len(items),
        "judged": len(judged),
        "stale": len({j["item"] for j in judgements} - {i.id for i in items}),
        "task_type": task,
        "overall": _outcomes([latest[item.id]["verdict"] for item in judged]),
        "groups": {
            dimension: {value: _outcomes(v) for value, v in sorted(values.items())}
            for dimension, values in groups.items()
        },
        "agreement": _agreement(items, latest, task),
    }


def _ci(outcome: Mapping[str, Any]) -> str:
    low, high = outcome["ci95"]
    return f"{outcome['rate']:.3f} [{low:.3f}, {high:.3f}]"


def format_summary(summary: Mapping[str, Any]) -> str:
    """The summary as a Markdown section (headed `## Human review`)."""
    overall = summary["overall"]
    lines = [
        SECTION_TITLE,
        "",
        f"{summary['judged']} of {summary['items']} held-out items judged blind "
        f"(`{REVIEW_LOG}`; the last judgement of an item counts"
        + (
            f"; {summary['stale']} judged items of an earlier evaluation ignored"
            if summary["stale"]
            else ""
        )
        + "). Fine-tuned vs base, rate with 95% Wilson interval:",
        "",
        "| outcome | items | rate [95% CI] |",
        "|---|---:|---|",
    ]
    names = {
        "win": "win (fine-tuned better)",
        "tie": "tie",
        "both_bad": "both bad",
        "loss": "loss (base better)",
    }
    for key, name in names.items():
        lines.append(f"| {name} | {overall[key]['count']} | {_ci(overall[key])} |")
    for dimension, values in summary["groups"].items():
        lines += [
            "",
            f"Per {dimension}:",
            "",
            f"| {dimension} | items | win | tie | both bad | loss | win rate [95% CI] |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for value, o in values.items():
            counts = " | ".join(str(o[k]["count"]) for k in names)
            lines.append(f"| {_cell(value)} | {o['n']} | {counts} | {_ci(o['win'])} |")
    agreement = summary["agreement"]
    lines.append("")
    if agreement["n"]:
        prefers = (
            "exactly one answer is right by it"
            if summary.get("task_type") in _PASS_FAIL
            else "it scores one answer higher"
        )
        lines.append(
            f"Agreement with {agreement['metric']}: on {agreement['n']} judged items "
            f"{prefers}; the reviewer preferred that one on {agreement['count']}: "
            f"{_ci(agreement)} ({agreement['undecided']} judged tie or both bad)."
        )
    else:
        lines.append(
            f"Agreement with {agreement['metric']}: the metric scores both answers "
            "alike on every judged item (or there is no reference), so there is "
            "nothing to compare."
        )
    return "\n".join(lines) + "\n"


# Task types whose headline metric is right / wrong per item.
_PASS_FAIL = ("classification", "extraction", "instruction")


def _cell(text: str) -> str:
    """A value safe inside a Markdown table cell."""
    return re.sub(r"\s+", " ", text).replace("|", "\\|") or "(empty)"


def report_section(eval_dir: str | os.PathLike) -> str | None:
    """The `## Human review` Markdown for `eval_report.md`; None without reviews."""
    if not (pathlib.Path(eval_dir) / REVIEW_LOG).is_file():
        return None
    try:
        return format_summary(summarize(eval_dir))
    except ReviewError as e:
        _LOG.warning("human review not summarised: %s", e)
        return None


def update_report(eval_dir: str | os.PathLike, section: str) -> pathlib.Path | None:
    """Replaces (or appends) the Human review section of `eval_report.md`."""
    path = pathlib.Path(eval_dir) / REPORT_MD
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    pattern = re.compile(rf"^{re.escape(SECTION_TITLE)}\n.*?(?=^## |\Z)", re.M | re.S)
    text = pattern.sub("", text).rstrip("\n")
    atomic.write_text(path, f"{text}\n\n{section}")
    return path


def summary_command(workdir: str | os.PathLike) -> str:
    """`gemma4-keras review --summary`: the summary text; updates eval_report.md."""
    eval_dir = pathlib.Path(workdir) / "eval"
    section = format_summary(summarize(eval_dir))
    written = update_report(eval_dir, section)
    where = f"(also in {written})" if written else f"(no {eval_dir / REPORT_MD})"
    return f"{section}\n{where}"
