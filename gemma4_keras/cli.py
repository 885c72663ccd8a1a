"""`gemma4-keras <command>`: parse flags, log versions and config, delegate.

    gemma4-keras train    --config=configs/tiny.py --workdir=runs/tiny
    gemma4-keras evaluate --config=configs/tiny.py --workdir=runs/tiny
    gemma4-keras generate --config=configs/tiny.py --workdir=runs/tiny --prompt="..."
                          [--image=cat.png] [--audio=clip.wav]
    gemma4-keras export   --config=configs/tiny.py --workdir=runs/tiny --format=hf --out=DIR
    gemma4-keras data     check|stats|split|render --config=configs/tiny.py [--out=DIR]
    gemma4-keras review   --workdir=runs/tiny [--summary]
    gemma4-keras plan     --config=configs/e4b_qlora.py --config.model.preset=DIR [--tflops=..]
                          [--accelerator=t4|2xt4|v5e-8|...] [--devices=N]

Every command but `review` takes `--config=<file>.py[:arg]` with `--config.<field>=<value>`
overrides (the config is locked: a misspelt field is an error) and most take
`--workdir`. Each command turns its flags into arguments of the function of
`training/api.py` that a notebook calls (`gemma4_keras.run`, `.evaluate`,
...): this module holds no behaviour of its own. Adding a command is one
function decorated with `@command`. A test calls `main(["gemma4-keras",
"train", ...])`, which returns the exit code instead of exiting.

From the package this module imports `training.api` only, after flag
parsing (`_api`): `--help` and a bad flag answer at once. `train` holds a
SIGTERM / SIGINT that comes during that seconds-long import and hands it
to `api.run`, which records it (exit 3) instead of the process dying.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable

# TensorFlow (pulled in by KerasHub's tokenizers) logs INFO lines at import.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import ast  # noqa: E402
import contextlib  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import traceback  # noqa: E402

from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Run config: configs/<file>.py[:arg].", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory of the run (created; rerun to resume).")
flags.DEFINE_string("out", None, "Output directory (data split, export, eval report).")
flags.DEFINE_multi_string("prompt", [], "generate: a user message (repeatable).")
flags.DEFINE_multi_string(
    "image", [], "generate: an image file put before each --prompt's text (repeatable)."
)
flags.DEFINE_multi_string(
    "audio",
    [],
    "generate: a 16 kHz WAV file put before each --prompt's text (repeatable).",
)
flags.DEFINE_string(
    "prompts_file",
    None,
    "generate: JSONL of {'messages': [...], 'tools'?: [...]} or plain lines.",
)
flags.DEFINE_string(
    "adapter",
    None,
    "generate: a PEFT adapter dir (default: <workdir>/adapter; 'none' = base).",
)
flags.DEFINE_integer("max_new_tokens", 256, "generate: tokens to generate per prompt.")
flags.DEFINE_integer(
    "limit", 0, "data render: the most training examples to write; 0 = all."
)
flags.DEFINE_float(
    "tflops", 100.0, "plan: accelerator rating in the compute dtype, TFLOP/s."
)
flags.DEFINE_float("mfu", 0.4, "plan: assumed model FLOP utilisation, in (0, 1].")
flags.DEFINE_string(
    "accelerator",
    None,
    "plan: the device to fit: t4, l4, rtx4090, a100-40, a100-80, h100, h200, "
    "v5e, v5p (16 / 24 / 24 / 40 / 80 / 80 / 141 / 16 / 95 GB each); "
    "2xt4 or v5e-8 name the count too.",
)
flags.DEFINE_integer(
    "devices",
    None,
    "plan: devices of the run (the mesh with --config.distribution.*); default: "
    "the --accelerator count, else model_parallel under mode=model, else 1.",
)
flags.DEFINE_enum(
    "format",
    None,
    ["peft", "hf", "keras", "gguf", "gguf-lora"],
    "export: what to write (gguf-lora: the adapter as GGUF for llama.cpp / Ollama).",
)
flags.DEFINE_enum(
    "dtype",
    None,
    ["float32", "bfloat16", "float16"],
    "export hf/keras: stored weight dtype (default: the base's own; see the manifest).",
)
flags.DEFINE_string(
    "shard_size", "5GB", "export hf: largest safetensors shard (bytes, or 500MB / 5GB)."
)
flags.DEFINE_enum(
    "gguf_type",
    "f16",
    ["f32", "f16", "bf16", "q8_0", "q4_k_m"],
    "export gguf: tensor type (q4_k_m needs llama.cpp's llama-quantize).",
)
flags.DEFINE_string(
    "base_model",
    None,
    "export: base model id recorded in the export "
    "(default: the HF repo of the preset, e.g. google/gemma-4-E4B-it).",
)
flags.DEFINE_enum(
    "layout",
    None,
    ["causal_lm", "conditional_generation"],
    "export peft: PEFT key layout (default: the base's own; multimodal bases: "
    "conditional_generation).",
)
flags.DEFINE_bool(
    "verify",
    False,
    "export: then run the export in its engine (transformers, PEFT, KerasHub, "
    "llama.cpp) against the package's model on held-out prompts; writes "
    "verify.json / verify.md, exits 1 naming the format on a disagreement.",
)
flags.DEFINE_integer(
    "verify_prompts", 16, "export --verify: held-out prompts compared (the first N)."
)
flags.DEFINE_bool(
    "summary", False, "review: print the human-review summary instead of serving."
)
flags.DEFINE_string(
    "host",
    None,
    "review: address to bind (default 127.0.0.1, loopback clients only; "
    "given explicitly, every client that reaches it is served).",
)
flags.DEFINE_integer("port", 0, "review: TCP port of the page (0 = any free port).")
flags.DEFINE_bool(
    "force",
    False,
    "export: also export a run that did not finish, or an adapter holding NaN/inf.",
)
flags.DEFINE_bool(
    "merged",
    False,
    "evaluate: also evaluate the merged model (the adapter folded into the "
    "unquantised base, as merged exports serve it); = --config.eval.merged=true.",
)
flags.DEFINE_bool(
    "verbose", False, "Log the resolved config; on an error, the Python traceback too."
)

# Exit codes: 0 done, 1 failed, 2 usage error, 3 preempted (rerun to resume).
EXIT_PREEMPTED = 3

COMMANDS: dict[str, tuple[Callable, str]] = {}
# Commands that need no config and start no accelerator (JAX is not started).
WITHOUT_MODEL: set[str] = set()


def command(name: str, help_text: str, model: bool = True):
    """Registers `fn(config, args)` as `gemma4-keras <name>`.

    `model=False`: the command needs no config and starts no accelerator
    (`fn` may get `config=None`).
    """

    def register(fn):
        COMMANDS[name] = (fn, help_text)
        if not model:
            WITHOUT_MODEL.add(name)
        return fn

    return register


def usage() -> str:
    lines = [
        "usage: gemma4-keras <command> --config=configs/<file>.py [flags]",
        "",
        "commands:",
    ]
    lines += [f"  {name:10s} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "gemma4-keras <command> --help: the command's flags"]
    return "\n".join(lines)


# The config fields most runs set, per command (`--config.<field>=<value>`).
COMMON_FIELDS = {
    "train": "model.preset data.path lora.rank train.epochs train.learning_rate "
    "train.batch_size train.grad_accum quant.mode eval.max_examples",
    "evaluate": "data.eval_path eval.max_examples eval.compare_base",
    "generate": "eval.max_new_tokens data.enable_thinking",
    "data": "data.path data.format data.fields data.max_length",
    "plan": "model.preset quant.mode train.batch_size data.max_length",
}


def command_help(name: str) -> str:
    """`gemma4-keras <name> --help`: what it does, its flags, common fields."""
    _, text = COMMANDS[name]
    config = "" if name in WITHOUT_MODEL else " --config=configs/<file>.py"
    lines = [f"usage: gemma4-keras {name}{config} [flags]", "", text, "", "flags:"]
    for flag in FLAGS.get_key_flags_for_module(sys.modules[__name__]):
        # absl writes an enum's choices first: "<a|b>: export: ...".
        help_text = flag.help.split(">: ", 1)[-1]
        head, sep, _ = help_text.partition(":")
        # "export hf: ..." belongs to export; a help without a command prefix to all.
        prefixed = sep and head.split()[0] in COMMANDS
        if flag.name == "config" and name in WITHOUT_MODEL:
            continue
        if not prefixed or head.split()[0] == name:
            lines.append(f"  --{flag.name}: {flag.help}")  # choices included
    if name in COMMON_FIELDS:
        lines += ["", "config fields most runs set (--config.<field>=<value>):"]
        lines += [f"  {field}" for field in COMMON_FIELDS[name].split()]
    return "\n".join(lines)


def _api():
    """`training.api` (it imports Keras, JAX and KerasHub: seconds)."""
    from gemma4_keras.training import api  # noqa: PLC0415  (heavy: Keras, JAX, KerasHub; after flag parsing, see the module doc)

    return api


_held_signals: list[int] = []  # SIGTERM / SIGINT during the import, for api.run


@contextlib.contextmanager
def _holding_signals():
    """Keeps SIGTERM / SIGINT in `_held_signals` while the body runs.

    A second one ends the process at once (nothing is written yet).
    """

    def hold(signum, frame):
        if _held_signals:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        _held_signals.append(signum)

    previous = {s: signal.signal(s, hold) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _require(value, flag: str) -> str:
    if not value:
        raise UsageError(f"--{flag} is required")
    return value


class UsageError(ValueError):
    """A missing or wrong command-line flag."""


@command("train", "fine-tune with LoRA / QLoRA (rerun to resume)")
def _train(config, args) -> int:
    api, workdir = _api(), _require(FLAGS.workdir, "workdir")
    state = api.run(config, workdir, held_signals=_held_signals)
    note = api.run_note(config, workdir, state)
    if note:
        print(f"gemma4-keras train: {note}", file=sys.stderr)
    if state.get("status") == "preempted":
        return EXIT_PREEMPTED
    return 0 if state.get("status") in api.COMPLETE else 1


@command("evaluate", "base vs fine-tuned metrics on the held-out split of a run")
def _evaluate(config, args) -> int:
    if FLAGS.merged:
        config.eval.merged = True
    summary = _api().evaluate(config, _require(FLAGS.workdir, "workdir"), FLAGS.out)
    print(json.dumps(summary, indent=2))
    return 0


@command("generate", "answer prompts with the base model or an adapter")
def _generate(config, args) -> int:
    if FLAGS.max_new_tokens < 1:
        raise UsageError(f"--max_new_tokens={FLAGS.max_new_tokens} must be > 0")
    api = _api()
    lines = api.answer_lines(
        config,
        api.read_prompts(
            config, FLAGS.prompt, FLAGS.prompts_file, FLAGS.image, FLAGS.audio
        ),
        workdir=FLAGS.workdir,
        adapter=FLAGS.adapter,
        max_new_tokens=FLAGS.max_new_tokens,
    )
    for line in lines:
        print(json.dumps(line, ensure_ascii=False))
    return 0


@command("export", "write the adapter (peft) or a merged model (hf, keras, gguf)")
def _export(config, args) -> int:
    if not FLAGS.format:
        raise UsageError("--format=peft|hf|keras|gguf|gguf-lora is required")
    path = _api().export(
        config,
        _require(FLAGS.workdir, "workdir"),
        FLAGS.format,
        _require(FLAGS.out, "out"),
        shard_size=FLAGS.shard_size,
        gguf_type=FLAGS.gguf_type,
        layout=FLAGS.layout,
        dtype=FLAGS.dtype,
        base_model=FLAGS.base_model,
        force=FLAGS.force,
        verify=FLAGS.verify,
        verify_prompts=FLAGS.verify_prompts,
    )
    print(f"wrote {path}")
    return 0


@command(
    "review",
    "blind human review of base vs fine-tuned answers (--summary)",
    model=False,
)
def _review(config, args) -> int:
    workdir = _require(FLAGS.workdir, "workdir")
    result = _api().review(
        workdir, summary=FLAGS.summary, host=FLAGS.host, port=FLAGS.port
    )
    if FLAGS.summary:
        print(result)
        return 0
    return result


@command("plan", "estimate memory and speed of a run before starting it")
def _plan(config, args) -> int:
    api = _api()
    estimate = api.plan(
        config,
        tflops=FLAGS.tflops,
        mfu=FLAGS.mfu,
        devices=FLAGS.devices,
        accelerator_name=FLAGS.accelerator,
        out=FLAGS.out,
    )
    print(api.format_plan(estimate))
    return 0


@command("data", "check | stats | split | render the configured dataset")
def _data(config, args) -> int:
    verb = args[0] if args else ""
    if verb not in ("check", "stats", "split", "render"):
        raise UsageError("gemma4-keras data needs one of: check, stats, split, render")
    if verb == "render" and FLAGS.limit < 0:
        raise UsageError(f"--limit={FLAGS.limit} must be >= 0 (0 = all examples)")
    api = _api()
    if verb == "split":
        print(json.dumps(api.split(config, _require(FLAGS.out, "out")), indent=2))
    elif verb == "render":
        api.render(config, limit=FLAGS.limit, out=FLAGS.out or "-")
    else:  # check, stats: the report is printed
        getattr(api, verb)(config, out=FLAGS.out)
    return 0


def _quiet_libraries(record) -> bool:
    """Only the package's own INFO lines; every library's warnings pass.

    (Drops e.g. Orbax's per-save lines and JAX's "Unable to initialize
    backend 'tpu'" on machines without one.)
    """
    warning = 30  # the standard library's level (absl's WARNING is -1)
    own = f"{os.sep}gemma4_keras{os.sep}" in record.pathname
    if not own and record.exc_info and not FLAGS.verbose:
        # A library's background thread (Orbax's, on a full disk) logs its
        # traceback before the error reaches the user as one line: keep the
        # line it logged, cut, and leave the traceback to --verbose.
        text = " ".join(record.getMessage().split())
        record.msg, record.args = text[:200] + ("..." if len(text) > 200 else ""), ()
        record.exc_info = record.exc_text = None
    return record.levelno >= warning or own


def main(argv: list[str] | None = None) -> int:
    """Runs a command; returns the exit code (0 ok, 1 failed, 2 usage, 3 preempted)."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) >= 2 and argv[1] in ("--help", "-h", "help"):
        print(usage())
        return 0
    if len(argv) < 2 or argv[1] not in COMMANDS:
        print(usage(), file=sys.stderr)
        return 2
    name, rest = argv[1], argv[2:]
    if {"--help", "-h", "--helpfull"} & set(rest):
        print(command_help(name))
        return 0
    saved_argv = sys.argv
    spec = None
    # ml_collections reads `--config.x=y` overrides from sys.argv itself.
    sys.argv = [argv[0], *rest]
    try:
        FLAGS.unparse_flags()
        for flag in [f for f in FLAGS if f.startswith("config.")]:
            delattr(FLAGS, flag)  # overrides of an earlier main() in this process
        # ml_collections loads the file with SourceFileLoader.load_module, which
        # re-executes into an earlier main()'s module: a file that defines no
        # get_config would silently inherit the previous file's.
        sys.modules.pop("config_config", None)
        spec = _config_spec(rest)
        problem = _config_file_problem(spec) if spec else None
        if problem:
            print(f"gemma4-keras {name}: error: {problem}", file=sys.stderr)
            return 2
        positional = FLAGS(sys.argv)[1:]
    except Exception as e:
        # ml_collections raises AttributeError for a misspelt --config.field,
        # and wraps errors raised by the config file's own code.
        if spec and (
            "Traceback" in str(e)
            or not isinstance(
                e, (flags.Error, AttributeError, KeyError, TypeError, ValueError)
            )
        ):
            message = _config_code_error(spec, e)
        elif spec and "has no attribute 'get_config" in str(e):
            message = f"--config={spec}: the file defines no get_config(arg=None)"
        else:
            message = _bad_flag(e)
        print(f"gemma4-keras {name}: error: {message}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved_argv
    logging.use_absl_handler()
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_quiet_libraries)
    api = None
    _held_signals.clear()
    try:
        config = _CONFIG.value
        if name not in WITHOUT_MODEL and config is None:
            raise UsageError("--config=configs/<file>.py is required")
        # train: SIGTERM / SIGINT at any phase exit 3 (training/stopping.py)
        with _holding_signals() if name == "train" else contextlib.nullcontext():
            api = _api()
            if name not in WITHOUT_MODEL:
                # The resolved config: in the workdir (config.json) and with --verbose.
                api.start(config if FLAGS.verbose else None)
            fn, _ = COMMANDS[name]
            return fn(config, positional)
    except UsageError as e:
        print(f"gemma4-keras {name}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        line = api.error_line(e, FLAGS.out or FLAGS.workdir) if api else None
        if line is None and FLAGS.verbose:
            raise
        if FLAGS.verbose:
            traceback.print_exc()
        if line is None:
            first = (str(e).strip().splitlines() or [""])[0][:300]
            line = (
                f"unexpected {type(e).__name__}: {first} "
                "(rerun with --verbose for the traceback, and please report it)"
            )
        print(f"gemma4-keras {name}: error: {line}", file=sys.stderr)
        return 1


def _bad_flag(e: BaseException) -> str:
    """One line for a flag absl or ml_collections refused."""

    text = str(e)
    if text[:1] in ("'", '"') and text[:1] == text[-1:]:
        # KeyError (and ml_collections' AttributeError) show a repr.
        with contextlib.suppress(ValueError, SyntaxError):
            text = str(ast.literal_eval(text))
    return "bad flag: " + " ".join(text.replace("\\n", " ").split())


def _config_spec(args: list[str]) -> str | None:
    """The value of --config in an argv tail, or None."""
    for i, arg in enumerate(args):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(args):
            return args[i + 1]
    return None


def _config_file_problem(spec: str) -> str | None:
    """What stops the config file of `--config=spec` from loading, or None."""
    path = spec.split(":", 1)[0]
    if not os.path.exists(path):
        return f"--config={spec}: no such file {path}; give configs/<file>.py"
    if os.path.isdir(path):
        return f"--config={spec}: {path} is a directory; give configs/<file>.py"
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except (OSError, UnicodeDecodeError) as e:
        return f"--config={spec}: cannot read {path} ({getattr(e, 'strerror', e)})"
    try:
        compile(source, path, "exec")
    except SyntaxError as e:
        return f"{path}:{e.lineno}: syntax error in the config file: {e.msg}"
    return None


def _config_code_error(spec: str, e: BaseException) -> str:
    """One line for an error raised by the config file's code, with its line."""

    text = str(e)
    frames = re.findall(r'File "([^"]+)", line (\d+)', text) or [
        (f.filename, f.lineno) for f in traceback.extract_tb(e.__traceback__)
    ]
    path = os.path.abspath(spec.split(":", 1)[0])
    mine = [f for f in frames if os.path.abspath(f[0]) == path]
    file, line = (mine or frames or [(path, "?")])[-1]
    if "Traceback" in text:
        last = [ln for ln in text.strip().splitlines() if ln.strip()][-1].strip()
        last = re.sub(r"^[\w.]+\.(\w+): ", r"\1: ", last)  # module path of the type
    else:
        last = f"{type(e).__name__}: {text}"
    return f"--config={spec}: {file}:{line}: {' '.join(last.split())}"


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
