"""Blind human review: the server API, the judgement log, the summary math,
the report section, the CLI, and the page driven in headless Chromium."""

import contextlib
import http.client
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import oracles
import pytest

from gemma4_keras import cli
from gemma4_keras.eval import report, review

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHANNEL = "<channel|><channel|><channel|><channel|>"  # the tiny base model's answer

# (reference, base answer, fine-tuned answer) in the format of the tiny run's
# eval/predictions.jsonl. By accuracy: items 0-3 only the fine-tuned answer is
# right, item 4 neither, item 5 only the base answer.
ROWS = [
    ("positive", CHANNEL, "positive"),
    ("negative", CHANNEL, "negative"),
    ("positive", CHANNEL, "positive"),
    ("negative", CHANNEL, "negative"),
    ("positive", CHANNEL, "negative"),
    ("negative", "negative", "positive"),
]
HOSTILE_PROMPT = (
    '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'
)


def write_eval_dir(eval_dir: pathlib.Path, rows=None, task="classification"):
    """A run's eval/ directory as `gemma4-keras evaluate` leaves it."""
    eval_dir.mkdir(parents=True, exist_ok=True)
    rows = rows or [
        {
            "prompt": f"Review {i}: 'The soup was {ref}ly memorable.' Positive or negative?",
            "reference": ref,
            "prediction_base": base,
            "prediction_finetuned": tuned,
        }
        for i, (ref, base, tuned) in enumerate(ROWS)
    ]
    with open(eval_dir / "predictions.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    results = {
        "base": {"task_type": task, "accuracy": 1 / 6},
        "finetuned": {"task_type": task, "accuracy": 4 / 6},
    }
    (eval_dir / "eval_report.json").write_text(json.dumps({"models": results}))
    (eval_dir / "eval_report.md").write_text(
        "# Gemma 4 fine-tuning evaluation\n\n"
        + report.format_metrics_table(results)
        + "\n\n## Plots\n\n![loss](loss_curves.png)\n"
    )
    return eval_dir


@pytest.fixture
def eval_dir(tmp_path):
    return write_eval_dir(tmp_path / "run" / "eval")


@contextlib.contextmanager
def serving(eval_dir, host=None):
    """A review server on a free port for the duration of the block."""
    server = review.make_server(eval_dir, host=host, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def request(url, body=None, content_type="application/json", headers=None):
    """(status, decoded JSON or text, headers) of a GET (or POST with body)."""
    data = body if isinstance(body, bytes | None) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=dict(headers or {}))
    if data is not None:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            status, raw, got = response.status, response.read(), response.headers
    except urllib.error.HTTPError as e:
        status, raw, got = e.code, e.read(), e.headers
    text = raw.decode("utf-8")
    is_json = got.get("Content-Type", "").startswith("application/json")
    return status, json.loads(text) if is_json else text, got


def judgements(eval_dir):
    path = eval_dir / review.REVIEW_LOG
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------
# Items, order, log
# ----------------------------------------------------------------------------


def test_items_ids_and_order_are_stable(eval_dir):
    items = review.load_items(eval_dir)
    assert [item.index for item in items] == list(range(len(ROWS)))
    assert len({item.id for item in items}) == len(ROWS)
    assert items[0].groups == (("label", "positive"),)
    order = review.load_order(eval_dir, items)
    assert set(order.values()) <= {"base", "finetuned"}
    assert json.loads((eval_dir / review.ORDER_FILE).read_text()) == order
    # A restarted server shows every item the same way.
    assert review.load_order(eval_dir, review.load_items(eval_dir)) == order


def test_groups_from_row_fields(tmp_path):
    row = {"prompt": "p", "reference": "a long free text answer"}
    row.update(prediction_base="x", prediction_finetuned="y", task_type="summary")
    rows = [row, {**row, "prompt": "q", "label": "news"}]
    items = review.load_items(write_eval_dir(tmp_path / "eval", rows, "generation"))
    assert items[0].groups == (("task type", "summary"),)
    assert items[1].groups == (("task type", "summary"), ("label", "news"))


def test_identical_rows_are_separate_items(tmp_path):
    row = {"prompt": "p", "reference": "r", "prediction_base": "x"}
    row["prediction_finetuned"] = "y"
    items = review.load_items(write_eval_dir(tmp_path / "eval", [row, row]))
    assert items[0].id != items[1].id


def test_order_is_a_fair_draw(tmp_path):
    import random

    rows = [
        {"prompt": f"p{i}", "prediction_base": "x", "prediction_finetuned": "y"}
        for i in range(200)
    ]
    eval_dir = write_eval_dir(tmp_path / "eval", rows)
    order = review.load_order(eval_dir, review.load_items(eval_dir), random.Random(0))
    assert 70 < list(order.values()).count("finetuned") < 130


def test_missing_predictions_says_to_evaluate(tmp_path):
    with pytest.raises(review.ReviewError, match="run `gemma4-keras evaluate"):
        review.load_items(tmp_path)


def test_predictions_without_base_say_compare_base(tmp_path):
    rows = [{"prompt": "p", "reference": "r", "prediction_finetuned": "y"}]
    eval_dir = write_eval_dir(tmp_path / "eval", rows)
    with pytest.raises(
        review.ReviewError, match=r"predictions.jsonl:1: .*compare_base"
    ):
        review.load_items(eval_dir)


def test_torn_last_line_costs_only_itself(tmp_path, caplog):
    path = tmp_path / review.REVIEW_LOG
    path.write_text('{"item": "a", "verdict": "tie"}\n{"item": "b", "verd')
    review.append_judgement(path, {"item": "c", "verdict": "base"})
    with caplog.at_level(logging.WARNING):
        records = review.read_judgements(path)
    assert [r["item"] for r in records] == ["a", "c"]
    assert "not a judgement" in caplog.text


def test_client_allowed_only_loopback_by_default():
    for address in ("127.0.0.1", "127.8.9.1", "::1", "::ffff:127.0.0.1"):
        assert review.client_allowed(address, allow_remote=False), address
    for address in ("10.0.0.7", "192.168.1.2", "::ffff:10.0.0.7", "fe80::1", "x"):
        assert not review.client_allowed(address, allow_remote=False), address
    assert review.client_allowed("10.0.0.7", allow_remote=True)


def test_host_header_must_name_the_loopback_server():
    assert review.host_allowed("127.0.0.1:8000", 8000, allow_remote=False)
    assert review.host_allowed("localhost:8000", 8000, allow_remote=False)
    assert not review.host_allowed("evil.example:8000", 8000, allow_remote=False)
    assert not review.host_allowed(None, 8000, allow_remote=False)
    assert review.host_allowed("evil.example:8000", 8000, allow_remote=True)


# ----------------------------------------------------------------------------
# Server API
# ----------------------------------------------------------------------------


def test_api_serves_page_state_and_logs_judgements(eval_dir):
    with serving(eval_dir) as (url, server):
        status, page, headers = request(url + "/")
        assert status == 200 and '<script src="review.js">' in page
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        assert request(url + "/review.js")[0] == 200
        status, state, _ = request(url + "/api/state")
        assert status == 200 and state["resume"] == 0
        first = state["items"][0]
        # The page gets A and B, never which model wrote which.
        assert set(first) == {
            "id",
            "prompt",
            "reference",
            "a",
            "b",
            "choice",
            "comment",
            "revision",
        }
        order = server.app.order
        a_model = order[first["id"]]
        assert first["a"] == (ROWS[0][2] if a_model == "finetuned" else ROWS[0][1])

        body = {"item": first["id"], "choice": "A", "comment": " terse "}
        status, answer, _ = request(url + "/api/judgement", body)
        assert (status, answer["judged"], answer["total"]) == (200, 1, len(ROWS))
        second = state["items"][1]["id"]
        request(url + "/api/judgement", {"item": second, "choice": "both_bad"})
        request(url + "/api/judgement", {"item": second, "choice": "tie"})

        state = request(url + "/api/state")[1]
        assert state["resume"] == 2
        assert [row["choice"] for row in state["items"][:3]] == ["A", "tie", None]
        assert state["items"][0]["comment"] == "terse"

    lines = judgements(eval_dir)
    assert [line["choice"] for line in lines] == ["A", "both_bad", "tie"]
    assert lines[0]["verdict"] == a_model and lines[0]["a"] == a_model
    assert lines[0]["b"] == ({"base", "finetuned"} - {a_model}).pop()
    assert [line["verdict"] for line in lines[1:]] == ["both_bad", "tie"]
    assert lines[0]["index"] == 0 and lines[0]["time"].endswith("+00:00")
    assert set(os.listdir(eval_dir)) == {
        "predictions.jsonl",
        "eval_report.json",
        "eval_report.md",
        review.REVIEW_LOG,
        review.ORDER_FILE,
    }


@pytest.mark.parametrize(
    "body, message",
    [
        ({"item": "nope", "choice": "A"}, "item 'nope' is not in predictions.jsonl"),
        ({"item": None, "choice": "A"}, "item None is not in"),
        ({"choice": "A"}, "item None is not in"),
        ({"item": "ID", "choice": "C"}, "choice 'C' is not one of"),
        ({"item": "ID", "choice": "A", "comment": "x" * 2001}, "<= 2000 characters"),
        ({"item": "ID", "choice": "A", "comment": 3}, "comment must be a string"),
        ({"item": "ID", "choice": "A", "verdict": "base"}, "unknown fields"),
        (["ID", "A"], "must be a JSON object"),
        (b"{not json", "Expecting property name"),
    ],
)
def test_api_refuses_bad_judgements_with_400(eval_dir, body, message):
    with serving(eval_dir) as (url, server):
        item_id = server.app.items[0].id
        if isinstance(body, dict) and body.get("item") == "ID":
            body = {**body, "item": item_id}
        status, answer, _ = request(url + "/api/judgement", body)
    assert status == 400
    assert message in answer["error"]
    assert not (eval_dir / review.REVIEW_LOG).exists()


def test_api_refuses_other_content_types_hosts_and_paths(eval_dir):
    with serving(eval_dir) as (url, server):
        body = {"item": server.app.items[0].id, "choice": "A"}
        assert request(url + "/api/judgement", body, "text/plain")[0] == 415
        port = server.server_address[1]
        status, answer, _ = request(url + "/", headers={"Host": f"evil.example:{port}"})
        assert status == 403 and "127.0.0.1" in answer["error"]
        assert request(url + "/../predictions.jsonl")[0] == 404
        assert request(url + "/api/nothing", body)[0] == 404
    assert not (eval_dir / review.REVIEW_LOG).exists()


class _Recorder:
    """Stands in for a handler's socket side: records what it would send."""

    def __init__(self, server, address):
        self.server, self.client_address = server, (address, 40000)
        port = server.server_address[1]
        self.headers = {"Host": f"127.0.0.1:{port}"}
        self.sent = []

    def _send_json(self, status, value):
        self.sent.append((status, value))


def test_handler_refuses_non_loopback_clients(eval_dir):
    server = review.make_server(eval_dir)
    try:
        remote = _Recorder(server, "192.168.1.20")
        assert not review._Handler._allowed(remote)
        assert remote.sent[0][0] == 403 and "--host" in remote.sent[0][1]["error"]
        local = _Recorder(server, "127.0.0.1")
        assert review._Handler._allowed(local) and not local.sent
        server.allow_remote = True  # as with an explicit --host
        assert review._Handler._allowed(_Recorder(server, "192.168.1.20"))
    finally:
        server.server_close()


def test_oversized_and_unsized_bodies_are_refused(eval_dir):
    with serving(eval_dir) as (url, _):
        big = {"item": "x", "choice": "A", "comment": "x" * review.MAX_BODY}
        assert request(url + "/api/judgement", big)[0] == 413
        connection = http.client.HTTPConnection(url.split("//")[1], timeout=10)
        connection.putrequest("POST", "/api/judgement")
        connection.putheader("Content-Type", "application/json")
        connection.endheaders()
        assert connection.getresponse().status == 411
        connection.close()
    assert not (eval_dir / review.REVIEW_LOG).exists()


def test_explicit_host_serves_other_hosts(eval_dir):
    with serving(eval_dir, host="127.0.0.1") as (url, server):
        port = server.server_address[1]
        status, _, _ = request(url + "/", headers={"Host": f"review.lan:{port}"})
    assert status == 200


# ----------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------


def test_wilson_interval_matches_hand_computation():
    # p = 0.8, z^2 = 3.84146: center = (0.8 + 0.192073) / 1.384146 = 0.716740,
    # half = 1.959964 * sqrt(0.016 + 0.0096037) / 1.384146 = 0.226578.
    low, high = review.wilson_interval(8, 10)
    assert low == pytest.approx(0.716740 - 0.226578, abs=2e-6)
    assert high == pytest.approx(0.716740 + 0.226578, abs=2e-6)
    # k = 0: [0, z^2 / (n + z^2)] = [0, 3.841459 / 7.841459].
    assert review.wilson_interval(0, 4) == pytest.approx((0.0, 0.489891), abs=1e-6)
    # k = n mirrors it.
    assert review.wilson_interval(4, 4) == pytest.approx((0.510109, 1.0), abs=1e-6)
    # p = 0.5, n = 2: z^2 / 4n^2 = 0.240091, half = 1.96 * sqrt(0.125 + 0.240091) / 2.920729.
    assert review.wilson_interval(1, 2) == pytest.approx((0.094531, 0.905469), abs=1e-6)
    assert review.wilson_interval(0, 0) == (0.0, 1.0)


def test_docstring_examples():
    import doctest

    assert doctest.testmod(review).failed == 0


def judge_as(eval_dir, verdicts):
    """Logs verdicts (model terms) through the app, as the page would."""
    app = review.ReviewApp(eval_dir)
    for index, verdict in verdicts:
        item = app.items[index]
        a_model = app.order[item.id]
        choice = {a_model: "A"}.get(
            verdict, "B" if verdict in ("base", "finetuned") else verdict
        )
        app.judge({"item": item.id, "choice": choice})
    return app


# items 0-3: only fine-tuned right; 4: neither; 5: only base right.
VERDICTS = [
    (0, "finetuned"),
    (1, "base"),
    (1, "finetuned"),  # re-judged: the last one counts
    (2, "tie"),
    (3, "base"),
    (4, "both_bad"),
    (5, "base"),
]


def test_summary_counts_last_judgement_per_item(eval_dir):
    judge_as(eval_dir, VERDICTS)
    with open(eval_dir / review.REVIEW_LOG, "a") as f:  # an earlier evaluation's
        f.write(json.dumps({"item": "0123456789abcdef", "verdict": "base"}) + "\n")
    summary = review.summarize(eval_dir)
    assert (summary["items"], summary["judged"], summary["stale"]) == (6, 6, 1)
    overall = summary["overall"]
    counts = {k: overall[k]["count"] for k in ("win", "tie", "both_bad", "loss")}
    assert counts == {"win": 2, "tie": 1, "both_bad": 1, "loss": 2}
    assert overall["win"]["rate"] == pytest.approx(2 / 6)
    assert overall["win"]["ci95"] == pytest.approx(review.wilson_interval(2, 6))
    # By hand: p = 1/3, n = 6: (0.0968, 0.7000).
    assert overall["win"]["ci95"] == pytest.approx((0.09677, 0.70000), abs=1e-4)
    labels = summary["groups"]["label"]
    # positive: items 0 (win), 2 (tie), 4 (both bad); negative: 1 (win), 3, 5 (loss).
    assert labels["positive"]["n"] == 3 and labels["positive"]["win"]["count"] == 1
    assert labels["negative"]["loss"]["count"] == 2


def test_summary_agreement_with_the_metric(eval_dir):
    judge_as(eval_dir, VERDICTS)
    agreement = review.summarize(eval_dir)["agreement"]
    # Accuracy prefers one answer on items 0, 1, 2, 3, 5 (not 4: both wrong);
    # the reviewer agrees on 0, 1 and 5, called 2 a tie and disagreed on 3.
    assert agreement["metric"] == "accuracy"
    assert (agreement["n"], agreement["count"], agreement["undecided"]) == (5, 3, 1)
    assert agreement["ci95"] == pytest.approx(review.wilson_interval(3, 5))


def test_summary_without_judgements_is_an_error(eval_dir):
    with pytest.raises(review.ReviewError, match="gemma4-keras review --workdir="):
        review.summarize(eval_dir)


def test_format_summary_and_report_section(eval_dir):
    judge_as(eval_dir, VERDICTS)
    text = review.summary_command(eval_dir.parent)
    assert text.startswith("## Human review\n")
    assert "6 of 6 held-out items judged blind" in text
    assert "| win (fine-tuned better) | 2 | 0.333 [0.097, 0.700] |" in text
    assert "| loss (base better) | 2 | 0.333 [0.097, 0.700] |" in text
    assert "| positive | 3 | 1 | 1 | 1 | 0 | 0.333 [0.061, 0.792] |" in text
    assert "Agreement with accuracy: on 5 judged items exactly one answer" in text
    assert "preferred that one on 3: 0.600 [0.231, 0.882]" in text
    markdown = (eval_dir / "eval_report.md").read_text()
    assert markdown.index("## Plots") < markdown.index("## Human review")
    # Rerunning replaces the section instead of adding another.
    judge_as(eval_dir, [(0, "base")])
    review.summary_command(eval_dir.parent)
    markdown = (eval_dir / "eval_report.md").read_text()
    assert markdown.count("## Human review") == 1
    assert "| loss (base better) | 3 |" in markdown
    assert "| **accuracy** |" in markdown  # the rest of the report is kept


def test_eval_report_gets_the_section_when_reviews_exist(eval_dir):
    results = {
        "base": {"task_type": "classification", "accuracy": 1 / 6},
        "finetuned": {"task_type": "classification", "accuracy": 4 / 6},
    }
    report.write_eval_report(eval_dir, results=results)
    assert "## Human review" not in (eval_dir / "eval_report.md").read_text()
    judge_as(eval_dir, VERDICTS)
    report.write_eval_report(eval_dir, results=results)
    markdown = (eval_dir / "eval_report.md").read_text()
    assert "## Human review" in markdown and "| tie | 1 |" in markdown


# ----------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------


def run_cli(*args):
    return cli.main(["gemma4-keras", "review", *args])  # no --config needed


def test_cli_summary(eval_dir, capsys):
    judge_as(eval_dir, VERDICTS)
    assert run_cli(f"--workdir={eval_dir.parent}", "--summary") == 0
    out = capsys.readouterr().out
    assert "| win (fine-tuned better) | 2 | 0.333 [0.097, 0.700] |" in out


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert run_cli(f"--workdir={tmp_path}", "--summary") == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err
    assert "predictions.jsonl is missing: run `gemma4-keras evaluate" in lines[0]


def test_cli_serves_until_interrupted(eval_dir):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "gemma4_keras.cli", "review"]
    command += [f"--workdir={eval_dir.parent}"]
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C as in a terminal: a pytest-xdist worker (or a shell's `&`)
        # may ignore SIGINT, and a child inherits that, so Python would never
        # raise KeyboardInterrupt in it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        line = process.stdout.readline()  # blocks until the URL (or exit)
        assert line.startswith("review: open http://127.0.0.1:"), process.stderr.read()
        url = line.split()[2]
        status, state, _ = request(url + "api/state")
        assert status == 200 and len(state["items"]) == len(ROWS)
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0
    assert "review: stopped" in out


# ----------------------------------------------------------------------------
# The page in headless Chromium
# ----------------------------------------------------------------------------

INSTALL = (
    "the browser tests need Chromium, its driver and selenium: "
    "apt-get install chromium chromium-driver && pip install selenium"
)


def _chromium() -> tuple[str, str] | None:
    for browser in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(browser):
            driver = shutil.which("chromedriver")
            return (shutil.which(browser), driver) if driver else None
    return None


@pytest.fixture
def browser(tmp_path):
    try:
        from selenium import webdriver
    except ImportError:
        oracles.unavailable(f"selenium is not installed; {INSTALL}")
    found = _chromium()
    if found is None:
        oracles.unavailable(f"no chromium / chromedriver on PATH; {INSTALL}")
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1100,900",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(argument)
    service = webdriver.ChromeService(executable_path=found[1])
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for_progress(driver, prefix):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def progress(d):
        text = d.find_element(By.ID, "progress").text
        return text if text.startswith(prefix) else False

    return WebDriverWait(driver, 15).until(progress, f"progress never read {prefix!r}")


def press(driver, keys):
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(keys).perform()


def test_browser_review_with_keyboard_resumes(eval_dir, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    with serving(eval_dir) as (url, server):
        browser.get(url + "/")
        wait_for_progress(browser, "Item 1 of 6 · 0 judged")
        assert browser.find_element(By.ID, "prompt").text.startswith("Review 0:")
        press(browser, "a")
        wait_for_progress(browser, "Item 2 of 6 · 1 judged")
        press(browser, "c")  # into the comment box; keys there are text
        press(browser, "b is better" + Keys.ESCAPE)
        press(browser, "b")
        wait_for_progress(browser, "Item 3 of 6 · 2 judged")
        press(browser, "t")
        wait_for_progress(browser, "Item 4 of 6 · 3 judged")

        browser.refresh()
        wait_for_progress(browser, "Item 4 of 6 · 3 judged")
        assert browser.find_element(By.ID, "prompt").text.startswith("Review 3:")
        press(browser, Keys.ARROW_LEFT)  # back to item 3: its choice is shown
        wait_for_progress(browser, "Item 3 of 6")
        pressed = browser.find_element(By.CSS_SELECTOR, "[aria-pressed=true]")
        assert pressed.get_attribute("data-choice") == "tie"
        order = dict(server.app.order)

    lines = judgements(eval_dir)
    assert [(line["index"], line["choice"]) for line in lines] == [
        (0, "A"),
        (1, "B"),
        (2, "tie"),
    ]
    assert [line["comment"] for line in lines] == ["", "b is better", ""]
    items = review.load_items(eval_dir)
    assert lines[0]["verdict"] == order[items[0].id]
    assert lines[1]["verdict"] != order[items[1].id]
    summary = review.summarize(eval_dir)
    assert summary["judged"] == summary["overall"]["n"] == 3
    assert summary["overall"]["tie"]["count"] == 1
    wins = summary["overall"]["win"]["count"]
    expected = [
        order[items[0].id],
        ({"base", "finetuned"} - {order[items[1].id]}).pop(),
    ]
    assert wins == expected.count("finetuned")


def test_browser_renders_hostile_text_as_text(tmp_path, browser):
    from selenium.webdriver.common.by import By

    hostile_answer = '<b>bold</b><img src=x onerror="window.__pwned=3">'
    rows = [
        {
            "prompt": HOSTILE_PROMPT,
            "reference": "<img src=x onerror=window.__pwned=4>",
            "prediction_base": hostile_answer,
            "prediction_finetuned": "</div><script>window.__pwned=5</script>",
        }
    ]
    eval_dir = write_eval_dir(tmp_path / "eval", rows)
    with serving(eval_dir) as (url, _):
        browser.get(url + "/")
        wait_for_progress(browser, "Item 1 of 1")
        time.sleep(0.5)  # give any injected handler the chance to run
        assert browser.find_element(By.ID, "prompt").text == HOSTILE_PROMPT
        assert browser.find_element(By.ID, "reference").text == rows[0]["reference"]
        answers = {browser.find_element(By.ID, f"answer-{s}").text for s in "ab"}
        assert answers == {hostile_answer, rows[0]["prediction_finetuned"]}
        injected = browser.execute_script(
            "return document.querySelectorAll('main img, main script, main b').length"
        )
        assert injected == 0
        assert browser.execute_script("return window.__pwned === undefined")


# ----------------------------------------------------------------------------
# A stale tab, blank answers, the real workdir, a stopped server
# ----------------------------------------------------------------------------


def test_a_stale_judgement_is_refused_with_409(eval_dir):
    with serving(eval_dir) as (url, _):
        _, state, _ = request(url + "/api/state")
        first = state["items"][0]
        assert first["revision"] == 0
        body = {"item": first["id"], "choice": "A", "seen": 0}
        status, saved, _ = request(url + "/api/judgement", body)
        assert status == 200 and saved["revision"] == 1
        # A second tab that loaded before that judgement still holds seen=0.
        stale = {"item": first["id"], "choice": "B", "seen": 0}
        status, refused, _ = request(url + "/api/judgement", stale)
        assert status == 409 and refused["stale"] is True
        assert "item 1 was judged elsewhere" in refused["error"]
        assert "reload the page" in refused["error"]
        # The tab that made the judgement may change it (it knows revision 1).
        again = {"item": first["id"], "choice": "tie", "seen": 1}
        assert request(url + "/api/judgement", again)[0] == 200
        # A script that sends no `seen` is not checked.
        assert (
            request(url + "/api/judgement", {"item": first["id"], "choice": "B"})[0]
            == 200
        )
    assert [line["choice"] for line in judgements(eval_dir)] == ["A", "tie", "B"]


@pytest.mark.parametrize("seen", ["0", True, 1.5])
def test_seen_must_be_an_integer(eval_dir, seen):
    app = review.ReviewApp(eval_dir)
    with pytest.raises(review.ReviewError, match="must be the item's revision"):
        app.judge({"item": app.items[0].id, "choice": "A", "seen": seen})


def test_state_names_the_real_workdir(eval_dir):
    assert review.ReviewApp(eval_dir).state()["workdir"] == str(eval_dir.parent)


def _text(driver, element_id):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text


def test_browser_second_tab_cannot_overwrite(eval_dir, browser):
    with serving(eval_dir) as (url, _):
        browser.get(url + "/")
        wait_for_progress(browser, "Item 1 of 6 · 0 judged")
        first_tab = browser.current_window_handle
        browser.switch_to.new_window("tab")
        browser.get(url + "/")
        wait_for_progress(browser, "Item 1 of 6 · 0 judged")
        press(browser, "a")  # the second tab judges item 1
        wait_for_progress(browser, "Item 2 of 6 · 1 judged")
        browser.switch_to.window(first_tab)
        press(browser, "b")  # the first tab still shows item 1 unjudged
        status = _text(browser, "status")
        assert status.startswith("Not saved: item 1 was judged elsewhere"), status
        assert _text(browser, "progress").startswith("Item 1 of 6 · 0 judged")
    assert [line["choice"] for line in judgements(eval_dir)] == ["A"]


def test_browser_shows_blank_answers_and_the_workdir(tmp_path, browser):
    rows = [
        {
            "prompt": "Say nothing.",
            "reference": "ok",
            "prediction_base": "  \n",
            "prediction_finetuned": "",
        }
    ]
    eval_dir = write_eval_dir(tmp_path / "my run" / "eval", rows)
    with serving(eval_dir) as (url, _):
        browser.get(url + "/")
        wait_for_progress(browser, "Item 1 of 1")
        answers = {_text(browser, "answer-a"), _text(browser, "answer-b")}
        assert answers == {"(empty answer)", "(only whitespace: 2 spaces, 1 newline)"}
        press(browser, "x")
        wait_for_progress(browser, "All 1 judged")
        command = _text(browser, "summary-command")
        assert command == f"gemma4-keras review --workdir='{eval_dir.parent}' --summary"


def test_browser_explains_a_stopped_server(eval_dir, browser):
    with serving(eval_dir) as (url, _):
        browser.get(url + "/")
        wait_for_progress(browser, "Item 1 of 6")
    # The server is gone; the page is still open.
    press(browser, "a")
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 15).until(lambda d: _text(d, "status"), "no status")
    status = _text(browser, "status")
    assert "the review server is not answering" in status, status
    assert f"gemma4-keras review --workdir={eval_dir.parent}" in status
    assert "Failed to fetch" not in status
