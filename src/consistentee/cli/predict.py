"""``consistentee predict``: label texts with early exit, one JSON line per input.

Input: a text file (one text per line), a CSV/TSV/JSON/JSONL file with ``--text-column`` (and
``--text-pair-column`` for sentence pairs), or standard input when ``--input`` is omitted or ``-``
(plain lines, or JSON lines when ``--text-column`` is given). Output: JSON lines
``{"label", "probability", "exit_layer"}`` (and ``"scores"`` with ``--top-k``) in input order: to stdout as
each batch finishes, or to ``--output``, written atomically. Without ``--rule`` and ``--knob``, the operating
point stored in the model folder is used (and said so on stderr). A run directory resolves to its trained
ConsistentEE policy model; several, or none, is an error that lists what exists.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from consistentee.cli.options import _Formatter, _one_line, common_options, deprecated_alias
from consistentee.data.files import parse_jsonl, read_csv_records
from consistentee.exits.rules import PREDICT_RULES, parse_knob

INPUT_FORMATS = ("auto", "txt", "csv", "tsv", "json", "jsonl")
AUTOCAST_CHOICES = ("none", "fp16", "bf16")


# -- shared with ``consistentee serve``: the model options, the predictor, the verb and the standalone entry ---


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The options that choose the model, its exit rule and its precision."""
    parser.add_argument("--model", required=True,
                        help="a saved model directory (config.json, model.safetensors, tokenizer) or a run directory")
    parser.add_argument("--policy-model-dir", default=None,
                        help="inside a run directory: the model directory to use (e.g. policies/beta-0.05/model)")
    parser.add_argument("--learned-heads", default=None, help="directory of learned exit heads (rule 'learned')")
    parser.add_argument("--rule", default=None, choices=PREDICT_RULES,
                        help="exit rule (default: the model's stored operating point, else consistentee)%(default).0s")
    parser.add_argument("--knob", default=None,
                        help="the rule's knob (patience/static: integer up to the number of layers, pcee: 't,S', "
                             "others: a number); omitted: the stored operating point's, else the rule's default%(default).0s")
    parser.add_argument("--max-length", type=int, default=None,
                        help="most tokens per text (default: what the model accepts)")
    parser.add_argument("--autocast", default="none", choices=AUTOCAST_CHOICES,
                        help="autocast dtype of the model (fp16/bf16 on GPU), or none; like benchmark's "
                             "--wall-autocast")
    deprecated_alias(parser, "--dtype", "--autocast", dest="autocast", choices=AUTOCAST_CHOICES)


def check_model_options(args: argparse.Namespace) -> None:
    """Everything about the model options that can be checked without loading anything (fast failures)."""
    if args.knob is not None:
        parse_knob(args.rule or "consistentee", args.knob)
    if args.max_length is not None and args.max_length < 2:
        raise ValueError(f"--max-length must be >= 2, got {args.max_length}")
    model = Path(args.model)
    if not model.exists() and (str(args.model).startswith((".", "/", "~")) or str(args.model).count("/") != 1):
        raise FileNotFoundError(f"{model}: no such model or run directory")


def predictor_from_args(args: argparse.Namespace, log: Callable[[str], None] | None = None):
    """The :class:`~consistentee.inference.predictor.EarlyExitPredictor` that :func:`add_model_options` describe.

    What was chosen for the user (a run directory's model, the stored operating point) goes to ``log``
    (default: one ``consistentee: ...`` line each on stderr)."""
    from consistentee.inference.predictor import EarlyExitPredictor

    rule = args.rule or ("consistentee" if args.knob is not None else None)
    predictor = EarlyExitPredictor.from_pretrained(
        args.model, rule=rule, knob=parse_knob(rule, args.knob) if rule else None,
        device=getattr(args, "device", "auto"), learned_heads_dir=args.learned_heads,
        policy_model_dir=args.policy_model_dir, max_length=args.max_length,
        autocast_dtype=None if args.autocast == "none" else args.autocast,
    )
    for note in predictor.notes:
        (log or _stderr)(note)
    return predictor


def _stderr(line: str) -> None:
    print(f"consistentee: {line}", file=sys.stderr, flush=True)


def add_verb(verbs, name: str, help_text: str, doc: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Add verb ``name`` with the options of ``configure`` and the common ones; ``doc`` (the module docstring)
    without its first paragraph is the description."""
    parser = verbs.add_parser(name, formatter_class=_Formatter, help=help_text,
                              description=doc.split("\n\n", 1)[1].strip())
    configure(parser)
    common_options(parser)
    return parser


def standalone_main(prog: str, doc: str, configure: Callable[[argparse.ArgumentParser], None],
                    run: Callable[[argparse.Namespace], int], argv: list[str] | None) -> int:
    """``python -m consistentee.cli.VERB``: the verb's options, ``--device``, one-line errors with status 2."""
    parser = argparse.ArgumentParser(prog=prog, description=doc)
    configure(parser)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    args = parser.parse_args(argv)
    args.progress = False
    try:
        return run(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, OSError) as exc:
        print(f"consistentee: error: {_one_line(exc)}", file=sys.stderr)
        return 2


# -- the predict verb ------------------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``predict`` options to ``parser`` (without the common ones)."""
    add_model_options(parser)
    parser.add_argument("--input", default="-", help="input file; '-' or omitted reads standard input")
    parser.add_argument("--input-format", default="auto", choices=INPUT_FORMATS,
                        help="auto: from the file suffix (.txt/.csv/.tsv/.json/.jsonl); stdin: txt, or jsonl "
                             "when --text-column is given")
    parser.add_argument("--text-column", default=None, help="column (CSV/TSV) or key (JSON/JSONL) with the text")
    parser.add_argument("--text-pair-column", default=None, help="column with the second text of a pair")
    parser.add_argument("--output", default=None,
                        help="JSONL output file (written atomically); stdout (streamed batch by batch) if omitted")
    parser.add_argument("--top-k", default=None, metavar="K",
                        help="also write the K most likely labels with their probabilities ('all': every label)")
    parser.add_argument("--batch-size", type=int, default=32, help="inputs per engine call")
    parser.add_argument("--sort-by-length", action="store_true", help="batch inputs of similar length together")
    parser.add_argument("--truncation", action="store_true",
                        help="truncate inputs longer than --max-length instead of failing")


def add_parser(verbs) -> argparse.ArgumentParser:
    return add_verb(verbs, "predict", "label texts with early exit (JSON lines out)", __doc__, configure)


# -- reading inputs ---------------------------------------------------------------------------------


def _decode(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{source}: not valid UTF-8 (bad byte at offset {exc.start}); re-save it as UTF-8") from None


def _cell(value: Any, source: str, column: str, row: int) -> str:
    if value is None or (isinstance(value, float) and value != value):
        raise ValueError(f"{source}: missing value in column {column!r} at row {row}")
    text = value if isinstance(value, str) else str(value)
    if not text.strip():
        raise ValueError(f"{source}: empty text in column {column!r} at row {row}")
    return text


def _records_to_items(records: list[dict], source: str, text_column: str | None, pair_column: str | None):
    if text_column is None:
        raise ValueError(f"{source}: pass --text-column to say which column holds the text")
    if not records:
        raise ValueError(f"{source}: no rows")
    available = list(records[0])
    for column in (text_column, pair_column):
        if column is not None and column not in available:
            raise ValueError(f"{source}: no column {column!r}; available: {', '.join(map(str, available))}")
    items = []
    for row, record in enumerate(records, start=1):
        if text_column not in record:
            raise ValueError(f"{source}: row {row} has no {text_column!r}")
        text = _cell(record[text_column], source, text_column, row)
        if pair_column is None:
            items.append(text)
        else:
            items.append((text, _cell(record.get(pair_column), source, pair_column, row)))
    return items


def read_inputs(
    path: str | None,
    input_format: str = "auto",
    text_column: str | None = None,
    text_pair_column: str | None = None,
    stdin=None,
) -> list:
    """Texts (or (text, pair) tuples) from a file or stdin; raises ValueError/FileNotFoundError with one line."""
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"unknown input format {input_format!r}; choose one of {', '.join(INPUT_FORMATS)}")
    if text_pair_column is not None and text_column is None:
        raise ValueError("--text-pair-column needs --text-column")
    text, source, fmt = _read_source(path, input_format, text_column, stdin)
    if not text.strip():
        raise ValueError(f"{source}: no input (empty)")
    if fmt == "txt":
        if text_column is not None:
            raise ValueError(f"{source}: --text-column applies to CSV/TSV/JSON/JSONL input, not plain text")
        return _lines(text, source)
    return _records_to_items(_parse_records(text, fmt, source), source, text_column, text_pair_column)


def _read_source(path: str | None, input_format: str, text_column: str | None, stdin) -> tuple[str, str, str]:
    """(text, name for messages, format) of the input file, or of standard input when ``path`` is None or '-'."""
    if path in (None, "-"):
        source = "<stdin>"
        stream = stdin if stdin is not None else sys.stdin
        raw = stream.buffer.read() if hasattr(stream, "buffer") else stream.read()
        text = _decode(raw, source) if isinstance(raw, bytes) else raw
        return text, source, input_format if input_format != "auto" else ("jsonl" if text_column else "txt")
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"{file}: input file not found")
    if file.is_dir():
        raise ValueError(f"{file}: is a directory, expected an input file")
    fmt = input_format
    if fmt == "auto":
        suffix = file.suffix.lower().lstrip(".")
        fmt = suffix if suffix in INPUT_FORMATS else "txt"
    try:
        return _decode(file.read_bytes(), str(file)), str(file), fmt
    except OSError as exc:
        raise ValueError(f"{file}: cannot read ({exc.strerror or exc})") from None


def _lines(text: str, source: str) -> list[str]:
    """One text per line; blank lines at the end are ignored, inside they are an error."""
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise ValueError(f"{source}: line {number} is empty (one text per line)")
    return lines


def _parse_records(text: str, fmt: str, source: str) -> list[dict]:
    """The rows of a CSV/TSV, JSON Lines or JSON (a list of objects) input."""
    if fmt in ("csv", "tsv"):
        return read_csv_records(text, source, "\t" if fmt == "tsv" else ",")
    if fmt == "jsonl":
        return parse_jsonl(text, source)
    try:  # json
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{source}: a JSON input must be a list of objects")
    return data


# -- writing ------------------------------------------------------------------------------------------


def _json_line(result: dict) -> str:
    return json.dumps(result, ensure_ascii=False, allow_nan=False) + "\n"  # NaN is not JSON: fail, never print it


def write_results(results: Iterable[dict], output: str | None, stdout=None) -> int:
    """JSON lines to ``output`` (a temporary file swapped in at the end) or to stdout, flushed line by line as
    ``results`` (possibly a generator) yields them. Returns the number written."""
    count = 0
    if output in (None, "-"):
        stream = stdout or sys.stdout
        for result in results:
            stream.write(_json_line(result))
            stream.flush()
            count += 1
        return count
    from consistentee.utils.io import atomic_path

    with atomic_path(output) as tmp, open(tmp, "w", encoding="utf-8") as file:
        for result in results:
            file.write(_json_line(result))
            count += 1
    return count


def _top_k(text: str | None) -> int | str | None:
    if text is None or text == "all":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"--top-k must be an integer >= 1 or 'all', got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    top_k = _top_k(getattr(args, "top_k", None))
    check_model_options(args)  # a bad knob or model path fails before the input is read
    if args.output not in (None, "-"):
        from consistentee.utils.io import check_writable

        check_writable(args.output)  # before minutes of work, naming the output
    items = read_inputs(args.input, args.input_format, args.text_column, args.text_pair_column)
    predictor = predictor_from_args(args)
    results = predictor.iter_predict(items, batch_size=args.batch_size, sort_by_length=args.sort_by_length,
                                     truncation=args.truncation, progress=getattr(args, "progress", False),
                                     top_k=top_k)
    layers: list[int] = []

    def counted():
        for result in results:
            layers.append(result["exit_layer"])
            yield result

    write_results(counted(), args.output)
    mean_exit = sum(layers) / len(layers)
    where = args.output if args.output not in (None, "-") else "stdout"
    print(f"{len(layers)} predictions ({predictor.rule!r}) to {where}; mean exit layer {mean_exit:.2f} of "
          f"{predictor.num_layers} (layer speed-up {predictor.num_layers / mean_exit:.2f}x)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (``python -m consistentee.cli.predict``), same options as the verb."""
    return standalone_main("consistentee predict", __doc__, configure, run, argv)


if __name__ == "__main__":
    sys.exit(main())
