"""A run's identity (its config.json and data_identity.json), for the commands that read a run.

`train` refuses a workdir that holds another run (`train.check_config`,
`check_data_identity`). `evaluate`, `generate --workdir` and `export` check
the same record here, each with the freedom it needs:

    check_config(config, workdir, "export")        # generate --workdir, export
    out = report_dir(config, workdir, out_dir)     # evaluate

* The config must be the run's (model, LoRA, quantisation, training), except
  `eval.*` and the data fields that choose the examples (`SELECTION_FIELDS`):
  evaluating on other data is allowed; generating and exporting read no data.
* `evaluate` on the run's own held-out examples writes `<workdir>/eval`
  (the run's report); on other data or another split it writes a new,
  named `<workdir>/eval-<data>-<hash>` and says so on stderr; it refuses a
  held-out set holding examples the run trained on, and an `--out` that
  would replace files it did not write (`outputs.check`).
* A finished run rerun with other `eval.*` fields is not evaluated again:
  `unapplied_eval_changes` is the note that says so.

These run before `evaluate_workdir` / `export` take the workdir lock: they
only read config.json and data_identity.json, which a later `train` can
rewrite only with the same identity.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys

from gemma4_keras import config_lib, outputs
from gemma4_keras.data import commands as data_commands
from gemma4_keras.data import quality
from gemma4_keras.data.records import Conversation, DataError
from gemma4_keras.eval import report
from gemma4_keras.settings import DataSettings
from gemma4_keras.training import train

# data.* fields that choose which examples are read and held out.
SELECTION_FIELDS = (
    "path",
    "eval_path",
    "holdout_fraction",
    "seed",
    "dedupe",
    "format",
    "fields",
    "on_error",
    "tfds_data_dir",
)
_PATHS = ("path", "eval_path", "tfds_data_dir")


def _read_json(path: str) -> dict | None:
    """A JSON object file, or None when absent or unreadable (train reports those)."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _recorded_data(workdir: str) -> dict | None:
    recorded = _read_json(os.path.join(workdir, "config.json"))
    data = (recorded or {}).get("data")
    return data if isinstance(data, dict) else None


def _is_run_config(config) -> bool:
    """A whole run config (a notebook may hand `export` a bare ConfigDict)."""
    return all(k in config for k in ("size", "method", "model", "lora", "data"))


def _with_recorded_selection(config, recorded: dict):
    """A copy of `config` whose `SELECTION_FIELDS` are the run's."""
    same = config.copy_and_resolve_references()
    for field in SELECTION_FIELDS:
        if field not in recorded or field not in same.data:
            continue
        value = recorded[field]
        try:
            if isinstance(value, dict):
                for key, item in value.items():
                    if key in same.data[field]:
                        same.data[field][key] = item
            else:
                same.data[field] = value
        except (TypeError, KeyError, AttributeError):
            pass  # left as given: check_config names the field
    return same


def check_config(config, workdir: str, command: str) -> None:
    """Raises WorkdirError when `config` is not the config of the run in `workdir`.

    As `train` checks a resumed run, except that `eval.*` and the data
    fields that choose examples (`SELECTION_FIELDS`) may differ.
    """
    if not _is_run_config(config) or not os.path.isfile(
        os.path.join(workdir, "config.json")
    ):
        return  # a new workdir (nothing trained), or a notebook's bare ConfigDict
    same = _with_recorded_selection(config, _recorded_data(workdir) or {})
    try:
        train.check_config(same, workdir)
    except train.WorkdirError as e:
        head = str(e).split(" Rerun with the same config")[0].rstrip(".")
        raise train.WorkdirError(
            f"{head}. gemma4-keras {command} needs the config the run trained with "
            "(its --config file and --config.* flags)"
        ) from e


def _shas(identity: dict) -> dict:
    return {k: (v or {}).get("sha256") for k, v in identity.items()}


def _same_value(field: str, a, b) -> bool:
    if field in _PATHS and a and b and not str(a).startswith("tfds:"):
        return os.path.realpath(str(a)) == os.path.realpath(str(b))
    if isinstance(a, dict) or isinstance(b, dict):
        return dict(a or {}) == dict(b or {})
    return a == b


def _run_settings(recorded: dict, settings: DataSettings) -> DataSettings:
    """`settings` with the run's selection fields (what it split and trained on)."""
    known = {f: recorded[f] for f in SELECTION_FIELDS if f in recorded}
    try:
        return config_lib.data_settings(dataclasses.replace(settings, **known))
    except (TypeError, ValueError):
        return settings


def _run_training(run: DataSettings, recorded_ids: dict | None) -> list | None:
    """The run's training conversations; None when its data files changed."""
    if recorded_ids is None:
        return None
    if _shas(train.data_identity(run)) != recorded_ids:
        return None
    try:
        return data_commands.read_and_split(run)[0]
    except (DataError, OSError):
        return None


def _describe(settings: DataSettings, run: DataSettings) -> list[str]:
    changed = []
    for field in SELECTION_FIELDS:
        now, was = getattr(settings, field), getattr(run, field)
        if not _same_value(field, now, was):
            changed.append(f"data.{field}={now!r} (the run's: {was!r})")
    return changed


def _location(settings: DataSettings, workdir: str, shas: dict) -> str:
    """`<workdir>/eval-<data file stem>-<8 hex of what was evaluated>`."""
    source = settings.eval_path or settings.path
    stem = os.path.splitext(os.path.basename(str(source).rstrip("/")))[0]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._") or "data"
    key = {
        f: os.path.realpath(v) if f in _PATHS and v and not v.startswith("tfds:") else v
        for f in SELECTION_FIELDS
        for v in [getattr(settings, f)]
    }
    text = json.dumps({"data": key, "sha256": shas}, sort_keys=True, default=str)
    return os.path.join(
        workdir, f"eval-{stem}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    )


def _check_overlap(
    holdout: list[Conversation], trained: list[Conversation], settings, run, workdir
) -> None:
    keys = {quality.content_hash(c) for c in trained}
    hits = [c for c in holdout if quality.content_hash(c) in keys]
    if not hits:
        return
    source = settings.eval_path or settings.path
    how = (
        f"data.eval_path={run.eval_path}"
        if run.eval_path
        else f"data.holdout_fraction={run.holdout_fraction}, data.seed={run.seed}"
    )
    raise DataError(
        f"{source}: {len(hits)} of the {len(holdout)} held-out examples (first: "
        f"{hits[0].source}) are training examples of the run in {workdir}; scores "
        "on them would overstate the adapter. Evaluate on data the run did not "
        f"train on (--config.data.eval_path=FILE), or on the run's own split ({how})"
    )


def eval_location(
    settings: DataSettings, holdout: list[Conversation], workdir: str
) -> tuple[str, str | None]:
    """Where `evaluate` writes the report of `holdout`, and why, if not the run's.

    Args:
      settings: the data settings evaluated (`config_lib.data_settings`).
      holdout: the conversations they hold out.
      workdir: the run.

    Returns:
      (`<workdir>/eval`, None) for the run's own held-out examples; else
      (`<workdir>/eval-<data>-<hash>`, what differs from the run).

    Raises:
      DataError: `holdout` holds examples the run trained on.
    """
    own = os.path.join(workdir, "eval")
    recorded = _recorded_data(workdir)
    if recorded is None:
        return own, None  # a run from before config.json: nothing to compare
    run = _run_settings(recorded, settings)
    recorded_ids = _read_json(os.path.join(workdir, "data_identity.json"))
    recorded_ids = _shas(recorded_ids) if recorded_ids is not None else None
    shas = _shas(train.data_identity(settings))
    changed = _describe(settings, run)
    if not changed and recorded_ids in (None, shas):
        return own, None
    if not changed:
        changed = [
            f"{settings.path} is not the data the run trained on (its sha256 changed)"
        ]
    trained = _run_training(run, recorded_ids)
    if trained is None:
        why_not = (
            f"{workdir}/data_identity.json is missing"
            if recorded_ids is None
            else f"{run.path} is not the file the run trained on any more"
        )
        print(
            "warning: cannot check the held-out examples against the run's "
            f"training examples: {why_not}",
            file=sys.stderr,
        )
    else:
        _check_overlap(holdout, trained, settings, run, workdir)
    return _location(settings, workdir, shas), "; ".join(changed)


def report_dir(config, workdir: str, out_dir: str | None = None) -> str:
    """Where `gemma4-keras evaluate` writes its report (checked; see the module doc).

    Returns:
      `out_dir` if given, else `eval_location`'s directory.

    Raises:
      DataError: the held-out examples hold training examples of the run.
      OutputError: `out_dir` is an input, or holds report files it would replace.
    """
    settings = config_lib.data_settings(config.data)
    holdout = data_commands.read_and_split(settings)[1]
    own, why = eval_location(settings, holdout, workdir)
    out = out_dir or own
    ev = config.eval
    models = ["base"] * bool(ev.compare_base) + ["finetuned"]
    models += ["merged"] * bool(ev.merged)
    outputs.check(
        out,
        report.output_names(models),
        inputs=outputs.run_inputs(config, workdir),
        replace=os.path.realpath(out) == os.path.realpath(own),
    )
    if why:
        print(
            f"gemma4-keras evaluate: not the run's own held-out examples ({why}): "
            f"the report goes to {out}; the run's {os.path.join(workdir, 'eval')} "
            "is kept",
            file=sys.stderr,
            flush=True,
        )
    return out


def unapplied_eval_changes(config, workdir: str) -> str | None:
    """The note for a finished run rerun with other `eval.*` fields, or None.

    `train` does not evaluate a finished run again; `gemma4-keras evaluate`
    with the same flags does.
    """
    recorded = _read_json(os.path.join(workdir, "config.json"))
    was = (recorded or {}).get("eval")
    if not isinstance(was, dict) or "eval" not in config:
        return None
    now = json.loads(config.to_json_best_effort()).get("eval", {})
    changed = sorted(k for k in now.keys() & was.keys() if now[k] != was[k])
    if not changed:
        return None
    fields = ", ".join(f"eval.{k}={now[k]!r} (was {was[k]!r})" for k in changed)
    return (
        f"note: {fields} not applied: a finished run is not evaluated again by "
        f"train; run `gemma4-keras evaluate` with the same --config flags and "
        f"--workdir={workdir} to apply {'them' if len(changed) > 1 else 'it'}"
    )
