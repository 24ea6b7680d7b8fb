"""A training run, step by step, in one directory.

    run_dir/
      run.json                 data and model settings (later stages re-read them from here)
      labels.json              label names in id order
      stage1/model/            the multi-exit model after stage 1 (config.json, model.safetensors, tokenizer)
      stage1/metrics.json      per-epoch loss, dev accuracy of every exit, time per epoch
      stage1/checkpoint/       only while stage 1 is running (resume point)
      memorized_layers.json    m(x) of every training example, keyed by example id
      memorized_layers.png     its histogram
      eval_<split>.json        per-exit accuracy of a split

Each step reads what the previous one wrote, so any step can be re-run alone from a saved run directory.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Subset
from transformers import AutoTokenizer

from consistentee.data import (
    DataCollator,
    DatasetSplits,
    EncodedSplit,
    LabelList,
    UnknownLabelError,
    encode_split,
    load_splits,
)
from consistentee.data.dataset import seeded_order
from consistentee.exits.tables import ExitTables, collect_exit_tables
from consistentee.model.configuration import MODEL_KIND
from consistentee.model.modeling import EarlyExitForSequenceClassification
from consistentee.resources import DEFAULT_MODEL, resolve_model_path
from consistentee.training.distributed import barrier, is_main_process
from consistentee.training.stage1 import NonFiniteLossError, Stage1Config, stage1_complete, train_stage1
from consistentee.utils.io import read_json, write_json
from consistentee.utils.runtime import resolve_device

RUN_FILE = "run.json"
POOLING_CHOICES = ("auto", "pooler", "cls", "mean")


@dataclass
class DataConfig:
    """Where the labelled text comes from and how it is cut."""

    dataset: str = field(default="rt-snippets", metadata={
        "help": "built-in name (rt-snippets, trec6, sms-spam, vitaminc), a CSV/TSV/JSON/JSONL/Parquet file, "
                "or hf:NAME_OR_PATH for a Hugging Face dataset", "metavar": "SOURCE"})
    text_column: str = field(default="text", metadata={"help": "column with the text (files and hf:)"})
    text_pair_column: str | None = field(default=None, metadata={"help": "second text column for sentence pairs"})
    label_column: str = field(default="label", metadata={"help": "column with the label"})
    id_column: str | None = field(default=None, metadata={"help": "column with stable example ids (else row numbers)"})
    dev_file: str | None = field(default=None, metadata={"help": "separate dev file (else carved from the data)"})
    test_file: str | None = field(default=None, metadata={"help": "separate test file (else carved from the data)"})
    max_length: int | None = field(default=None, metadata={
        "help": "tokens per example after truncation (none: the 95th percentile of the training texts' token "
                "lengths, capped at the model's limit; the value used is logged and kept in run.json)"})
    max_train_examples: int | None = field(default=None, metadata={"help": "use a seeded subset of the train split"})
    max_eval_examples: int | None = field(default=None, metadata={"help": "use a seeded subset of dev and test"})
    data_seed: int = field(default=0, metadata={"help": "seed of the dev/test carving and of subsets"})
    policy_holdout: float = field(default=0.0, metadata={
        "help": "fraction of the train split kept out of stage 1 and used by the policy stages instead, so the "
                "policies learn from exits that did not memorize their inputs (0: one shared train split)"})

    def __post_init__(self) -> None:
        if self.max_length is not None and (isinstance(self.max_length, bool) or not isinstance(self.max_length, int)
                                            or self.max_length < 2):
            raise ValueError(f"max_length must be >= 2, got {self.max_length!r}")
        if not 0.0 <= self.policy_holdout < 1.0:
            raise ValueError(f"policy_holdout must be in [0, 1), got {self.policy_holdout}")
        for name in ("max_train_examples", "max_eval_examples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")


@dataclass
class ModelConfig:
    """Which pretrained encoder gets the exits, and how its layer states are pooled."""

    model: str = field(default=DEFAULT_MODEL, metadata={
        "help": "built-in short name (minilm, mpnet), a local Hugging Face model directory or a hub id", "metavar": "MODEL"})
    pooling: str = field(default="auto", metadata={
        "help": "auto (the trained pooler when the checkpoint has one, else mean), pooler, cls, mean",
        "choices": POOLING_CHOICES})
    policy_hidden_size: int = field(default=32, metadata={"advanced": True,
        "help": "hidden width of each policy MLP"})
    classifier_dropout: float | None = field(default=None, metadata={"advanced": True,
        "help": "dropout on the pooled state before each exit classifier (none: the backbone config's "
                "classifier_dropout when set, else 0.1)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model code from the hub (off: unsafe)"})

    def __post_init__(self) -> None:
        if self.pooling not in POOLING_CHOICES:
            raise ValueError(f"unknown pooling {self.pooling!r}; choose one of {', '.join(POOLING_CHOICES)}")
        if self.policy_hidden_size < 1:
            raise ValueError(f"policy_hidden_size must be >= 1, got {self.policy_hidden_size}")
        if self.classifier_dropout is not None and not 0 <= self.classifier_dropout < 1:
            raise ValueError(f"classifier_dropout must be in [0, 1), got {self.classifier_dropout}")


@dataclass
class PreparedData:
    splits: DatasetSplits
    labels: LabelList
    encoded: dict[str, EncodedSplit]
    collate: DataCollator
    #: the max_length used (chosen from the data when the config left it to ``None``).
    max_length: int | None = None
    #: how max_length was chosen, for the log (None when the config gave it).
    max_length_note: str | None = None


#: Percentile of the training texts' token lengths that an automatic max_length covers.
AUTO_MAX_LENGTH_PERCENTILE = 95
#: Texts measured for the automatic max_length (a seeded sample beyond that).
AUTO_MAX_LENGTH_SAMPLE = 20_000


def model_token_limit(tokenizer) -> int | None:
    """The most tokens the model takes, from the tokenizer (None when it does not say)."""
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 1_000_000 else None


def auto_max_length(split, tokenizer, seed: int = 0) -> tuple[int, str]:
    """(max_length, a note): the 95th percentile of the split's token lengths, capped at the model's limit.

    A fixed 64 cut every text of a long-document set to 64 tokens; a limit from the data keeps most texts whole
    and still bounds the few longest."""
    indices = list(range(len(split)))
    if len(indices) > AUTO_MAX_LENGTH_SAMPLE:
        indices = sorted(seeded_order(split.ids, seed)[:AUTO_MAX_LENGTH_SAMPLE])
    texts = [split.texts[i] for i in indices]
    pairs = [split.text_pairs[i] for i in indices] if split.text_pairs is not None else None
    encoded = tokenizer(texts, pairs, truncation=False, padding=False, verbose=False)["input_ids"]
    lengths = sorted(len(row) for row in encoded)
    rank = max(0, -(-AUTO_MAX_LENGTH_PERCENTILE * len(lengths) // 100) - 1)
    value = max(lengths[rank] if lengths else 2, 2)
    limit = model_token_limit(tokenizer)
    capped = limit is not None and value > limit
    if capped:
        value = limit
    note = (f"max_length {value}: the {AUTO_MAX_LENGTH_PERCENTILE}th percentile of the training texts' token "
            f"lengths{f', capped at the model limit {limit}' if capped else ''} (longest {lengths[-1] if lengths else 0}; "
            "set --max-length to choose)")
    return value, note


def load_data(cfg: DataConfig) -> DatasetSplits:
    splits = load_splits(
        cfg.dataset,
        text_column=cfg.text_column,
        label_column=cfg.label_column,
        text_pair_column=cfg.text_pair_column,
        id_column=cfg.id_column,
        dev_file=cfg.dev_file,
        test_file=cfg.test_file,
        seed=cfg.data_seed,
    )
    limits = {"train": cfg.max_train_examples, "dev": cfg.max_eval_examples, "test": cfg.max_eval_examples}
    for name, limit in limits.items():
        split = getattr(splits, name)
        if limit is not None and limit < len(split):
            keep = sorted(seeded_order(split.ids, cfg.data_seed)[:limit])
            setattr(splits, name, split.select(keep))
    return splits


def train_partition(ids: list[str], holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """(stage-1 rows, policy rows) of the train split: a seeded, id-based hold-out, or all rows for both."""
    if holdout <= 0:
        everything = list(range(len(ids)))
        return everything, everything
    order = seeded_order(ids, seed + 1)
    held = max(1, round(holdout * len(ids)))
    return sorted(order[held:]), sorted(order[:held])


def policy_rows(data: PreparedData, data_cfg: DataConfig) -> list[int]:
    """Train-split rows that the learned exit rules (ConsistentEE policies, learned-exit heads) fit on: the
    held-out partition when ``policy_holdout`` > 0 (exits judged on examples stage 1 never saw), else all rows."""
    _, rows = train_partition(data.splits.train.ids, data_cfg.policy_holdout, data_cfg.data_seed)
    return rows


def train_subset(data: PreparedData, rows: list[int]):
    """The encoded train split restricted to ``rows`` (the split itself when that is every row)."""
    train_set = data.encoded["train"]
    return train_set if len(rows) == len(train_set) else Subset(train_set, rows)


def prepare_data(cfg: DataConfig, tokenizer, labels: LabelList | None = None) -> PreparedData:
    """Load, cut and tokenise; ``labels`` (a saved label list) fixes the ids when given. ``cfg.max_length``
    None: chosen from the training texts (:func:`auto_max_length`)."""
    splits = load_data(cfg)
    labels = labels or splits.labels
    max_length, note = cfg.max_length, None
    if max_length is None:
        max_length, note = auto_max_length(splits.train, tokenizer, cfg.data_seed)
    encoded = {}
    for name, split in splits:
        try:
            encoded[name] = encode_split(split, tokenizer, labels, max_length, name=f"{name} split")
        except UnknownLabelError as exc:
            raise UnknownLabelError(f"{name} split of {cfg.dataset}: {exc}") from None
    return PreparedData(splits, labels, encoded, DataCollator(tokenizer.pad_token_id), max_length, note)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def check_encoder_source(name_or_path: str) -> None:
    """Refuse, with one line, a local model path that is not a pretrained encoder this package will load.

    Weights are read only from safetensors: a folder that has pickle weights and no ``*.safetensors`` is refused
    (unpickling can run arbitrary code). Hub ids are left to the hub client."""
    text = resolve_model_path(name_or_path)
    path = Path(text).expanduser()
    if not path.exists():
        if text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep != "/" and os.sep in text or not text:
            raise ValueError(f"model directory {text!r} does not exist (nor is it a hub id 'org/name')")
        return  # a hub id: the hub client reports what is wrong with it
    if not path.is_dir():
        raise ValueError(f"model {name_or_path!r} is a file; pass a Hugging Face model directory or a hub id")
    config = path / "config.json"
    if not config.is_file():
        hint = " (it looks like a consistentee run directory)" if (path / RUN_FILE).is_file() else ""
        raise ValueError(f"model directory {path} has no config.json: not a Hugging Face model directory{hint}")
    try:
        kind = json.loads(config.read_text(encoding="utf-8")).get("kind")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise ValueError(f"{config} is not a valid JSON config") from None
    if kind == MODEL_KIND:
        raise ValueError(f"{path} is a trained consistentee early-exit model, not a pretrained encoder; train from "
                         "the encoder it was built on, or use it with evaluate/predict/serve")
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise ValueError(f"{path / pickled[0]} is a pickle file and {path} has no *.safetensors weights; "
                             "consistentee loads weights only from safetensors (unpickling can run arbitrary code). "
                             "Convert the checkpoint to safetensors first")
        raise ValueError(f"model directory {path} has no *.safetensors weights")


def _model_error(name_or_path: str, exc: BaseException) -> ValueError:
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return ValueError(f"cannot load the encoder {name_or_path!r}: {text}")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    check_encoder_source(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _model_error(name_or_path, exc) from None


def save_run_settings(run_dir: Path, data_cfg: DataConfig, model_cfg: ModelConfig) -> None:
    write_json(run_dir / RUN_FILE, {"data": asdict(data_cfg), "model": asdict(model_cfg)})


def load_run_settings(run_dir: str | Path) -> tuple[DataConfig, ModelConfig]:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a consistentee run directory")
    data = read_json(path)
    return DataConfig(**data["data"]), ModelConfig(**data["model"])


#: Stage-1 settings that may change between a run and its resumption without changing what is trained.
_RESUMABLE_STAGE1 = {"checkpoint_every", "eval_batch_size", "mixed_precision"}


def _differences(saved: dict, asked: dict, part: str, skip: set[str] = frozenset()) -> list[str]:
    return [f"{part}.{key}: run {saved[key]!r}, asked {value!r}" for key, value in asked.items()
            if key not in skip and key in saved and saved[key] != value]


def check_same_settings(run_dir: Path, data_cfg: DataConfig, model_cfg: ModelConfig, cfg: Stage1Config) -> None:
    """Refuse to reuse or resume a run directory trained with other data, model or stage-1 settings.

    Without this, ``stage1 --run-dir RUN --dataset other`` on a finished run reused its model without a word."""
    path = run_dir / RUN_FILE
    if not path.is_file():
        return
    try:
        saved = read_json(path)
        differ = (_differences(saved["data"], asdict(data_cfg), "data")
                  + _differences(saved["model"], asdict(model_cfg), "model"))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"{path} is damaged (not the JSON a run writes); use another --run-dir") from None
    metrics = run_dir / "stage1" / "metrics.json"
    if stage1_complete(run_dir / "stage1"):  # a finished stage would be reused as is
        try:
            differ += _differences(read_json(metrics).get("config") or {}, asdict(cfg), "stage1", _RESUMABLE_STAGE1)
        except (ValueError, AttributeError):
            pass  # a damaged metrics file: the resume logic reports it
    if differ:
        raise ValueError(f"{run_dir} was trained with other settings ({'; '.join(differ)}); use another --run-dir, "
                         f"or delete {run_dir} to start over")


def stage1_model_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "stage1" / "model"


def run_stage1(
    run_dir: str | Path,
    data_cfg: DataConfig,
    model_cfg: ModelConfig,
    cfg: Stage1Config,
    *,
    device: str = "auto",
    progress: bool = True,
    log=print,
) -> EarlyExitForSequenceClassification:
    """Stage 1 into ``run_dir/stage1``; a finished stage is loaded, an interrupted one resumed."""
    run_dir = Path(run_dir)
    if data_cfg.max_length is None and (run_dir / RUN_FILE).is_file():
        try:  # an automatic max_length means the one this run chose (in place: callers compare settings later)
            data_cfg.max_length = read_json(run_dir / RUN_FILE)["data"]["max_length"]
        except (ValueError, KeyError, TypeError):
            pass
    check_same_settings(run_dir, data_cfg, model_cfg, cfg)
    if stage1_complete(run_dir / "stage1"):
        log(f"stage 1 already complete in {run_dir / 'stage1'}; loading it")
        return EarlyExitForSequenceClassification.from_pretrained(stage1_model_dir(run_dir))
    # Everything is loaded and checked before anything is written: bad input leaves no run directory behind.
    tokenizer = load_tokenizer(model_cfg.model, model_cfg.trust_remote_code)
    data = prepare_data(data_cfg, tokenizer)
    if data.max_length_note:
        log(data.max_length_note)
        data_cfg.max_length = data.max_length  # in place: run.json and the caller's settings hold the value used
    torch.manual_seed(cfg.seed)
    try:
        model = EarlyExitForSequenceClassification.from_backbone(
            model_cfg.model,
            data.labels.names,
            pooling=None if model_cfg.pooling == "auto" else model_cfg.pooling,
            policy_hidden_size=model_cfg.policy_hidden_size,
            trust_remote_code=model_cfg.trust_remote_code,
            classifier_dropout=_classifier_dropout(model_cfg),
        )
    except (OSError, TypeError) as exc:
        raise _model_error(model_cfg.model, exc) from None
    main = is_main_process()
    created = not run_dir.exists()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_run_settings(run_dir, data_cfg, model_cfg)
        data.labels.save(run_dir)
        log(f"data {data_cfg.dataset}: " + ", ".join(f"{k} {v}" for k, v in data.splits.sizes().items())
            + f"; labels {', '.join(data.labels.names)}")
        log(f"model {model_cfg.model}: {model.num_layers} layers, pooling {model.config.pooling}")
    stage1_rows, _ = train_partition(data.splits.train.ids, data_cfg.policy_holdout, data_cfg.data_seed)
    held_out = len(data.encoded["train"]) - len(stage1_rows)
    if held_out:
        log(f"stage 1 trains on {len(stage1_rows)} examples; {held_out} are held out for the policy stages")
    train_set = train_subset(data, stage1_rows)
    try:
        train_stage1(model, tokenizer, train_set, data.encoded["dev"], data.collate, cfg,
                     run_dir / "stage1", device=device, progress=progress)
    except NonFiniteLossError:
        if main and created and not (run_dir / "stage1" / "checkpoint").exists():
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing worth keeping: leave no half-made run behind
        raise
    return model


def _classifier_dropout(model_cfg: ModelConfig) -> float:
    if model_cfg.classifier_dropout is not None:
        return model_cfg.classifier_dropout
    path = Path(resolve_model_path(model_cfg.model)) / "config.json"
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("classifier_dropout")
    except (OSError, ValueError, AttributeError):
        value = None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.1


def load_run_model(run_dir: str | Path, device: str = "auto") -> tuple[EarlyExitForSequenceClassification, PreparedData]:
    """The stage-1 model of a run and its data, tokenised with the run's own tokenizer and labels."""
    run_dir = Path(run_dir)
    data_cfg, _ = load_run_settings(run_dir)
    model_dir = stage1_model_dir(run_dir)
    # "cuda:1" / "cpu:0": a launched process's own device (accelerator.device), taken as is.
    torch_device = torch.device(device) if ":" in str(device) else resolve_device(device)
    if torch_device.type == "cpu":
        torch_device = torch.device("cpu")  # safetensors refuses "cpu:0"
    model = EarlyExitForSequenceClassification.from_pretrained(model_dir, device=torch_device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = prepare_data(data_cfg, tokenizer, LabelList.load(run_dir))
    return model, data


def split_tables(model, data: PreparedData, split: str, *, batch_size: int = 128, progress: bool = True) -> ExitTables:
    device = next(model.parameters()).device
    return collect_exit_tables(model, data.encoded[split], data.collate, batch_size=batch_size, device=device,
                               progress=progress, desc=split)


def run_evaluate(run_dir: str | Path, split: str = "test", *, device: str = "auto", batch_size: int = 128,
                 progress: bool = True, log=print) -> dict:
    """Accuracy of every exit on a split, written to ``eval_<split>.json`` (rank 0 only under a launcher)."""
    run_dir = Path(run_dir)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not is_main_process():
        barrier()
        return read_json(run_dir / f"eval_{split}.json")
    try:
        return _evaluate(run_dir, split, device, batch_size, progress, log)
    finally:
        barrier()


def _evaluate(run_dir: Path, split: str, device, batch_size, progress, log) -> dict:
    model, data = load_run_model(run_dir, device)
    tables = split_tables(model, data, split, batch_size=batch_size, progress=progress)
    accuracy = tables.per_exit_accuracy()
    result = {"split": split, "examples": len(data.splits.splits()[split]), "per_exit_accuracy": accuracy,
              "last_exit_accuracy": accuracy[-1]}
    write_json(run_dir / f"eval_{split}.json", result)
    log(f"{split} accuracy per exit (%): " + " ".join(f"{100 * a:.2f}" for a in accuracy))
    return result
