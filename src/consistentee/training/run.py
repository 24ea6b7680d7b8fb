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

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer

from consistentee.data import DataCollator, DatasetSplits, EncodedSplit, LabelList, encode_split, load_splits
from consistentee.data.dataset import seeded_order
from consistentee.evaluation.tables import ExitTables, collect_exit_tables
from consistentee.model.modeling import EarlyExitForSequenceClassification
from consistentee.resources import DEFAULT_MODEL, resolve_model_path
from consistentee.training import memorized
from consistentee.training.stage1 import Stage1Config, stage1_complete, train_stage1
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
    max_length: int = field(default=64, metadata={"help": "tokens per example after truncation"})
    max_train_examples: int | None = field(default=None, metadata={"help": "use a seeded subset of the train split"})
    max_eval_examples: int | None = field(default=None, metadata={"help": "use a seeded subset of dev and test"})
    data_seed: int = field(default=0, metadata={"help": "seed of the dev/test carving and of subsets"})

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        for name in ("max_train_examples", "max_eval_examples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")


@dataclass
class ModelConfig:
    """Which pretrained encoder gets the exits, and how its layer states are pooled."""

    model: str = field(default=DEFAULT_MODEL, metadata={
        "help": "built-in short name (minilm), a local Hugging Face model directory or a hub id", "metavar": "MODEL"})
    pooling: str = field(default="auto", metadata={
        "help": "auto (the trained pooler when the checkpoint has one, else mean), pooler, cls, mean",
        "choices": POOLING_CHOICES})
    policy_hidden_size: int = field(default=32, metadata={"help": "hidden width of each policy MLP"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model code from the hub (off: unsafe)"})

    def __post_init__(self) -> None:
        if self.pooling not in POOLING_CHOICES:
            raise ValueError(f"unknown pooling {self.pooling!r}; choose one of {', '.join(POOLING_CHOICES)}")
        if self.policy_hidden_size < 1:
            raise ValueError(f"policy_hidden_size must be >= 1, got {self.policy_hidden_size}")


@dataclass
class PreparedData:
    splits: DatasetSplits
    labels: LabelList
    encoded: dict[str, EncodedSplit]
    collate: DataCollator


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


def prepare_data(cfg: DataConfig, tokenizer, labels: LabelList | None = None) -> PreparedData:
    """Load, cut and tokenise; ``labels`` (a saved label list) fixes the ids when given."""
    splits = load_data(cfg)
    labels = labels or splits.labels
    encoded = {name: encode_split(split, tokenizer, labels, cfg.max_length) for name, split in splits}
    return PreparedData(splits, labels, encoded, DataCollator(tokenizer.pad_token_id))


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    return AutoTokenizer.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=trust_remote_code)


def save_run_settings(run_dir: Path, data_cfg: DataConfig, model_cfg: ModelConfig) -> None:
    write_json(run_dir / RUN_FILE, {"data": asdict(data_cfg), "model": asdict(model_cfg)})


def load_run_settings(run_dir: str | Path) -> tuple[DataConfig, ModelConfig]:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a consistentee run directory")
    data = read_json(path)
    return DataConfig(**data["data"]), ModelConfig(**data["model"])


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
    if stage1_complete(run_dir / "stage1"):
        log(f"stage 1 already complete in {run_dir / 'stage1'}; loading it")
        return EarlyExitForSequenceClassification.from_pretrained(stage1_model_dir(run_dir))
    tokenizer = load_tokenizer(model_cfg.model, model_cfg.trust_remote_code)
    data = prepare_data(data_cfg, tokenizer)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_run_settings(run_dir, data_cfg, model_cfg)
    data.labels.save(run_dir)
    log(f"data {data_cfg.dataset}: " + ", ".join(f"{k} {v}" for k, v in data.splits.sizes().items())
        + f"; labels {', '.join(data.labels.names)}")
    torch.manual_seed(cfg.seed)
    model = EarlyExitForSequenceClassification.from_backbone(
        model_cfg.model,
        data.labels.names,
        pooling=None if model_cfg.pooling == "auto" else model_cfg.pooling,
        policy_hidden_size=model_cfg.policy_hidden_size,
        trust_remote_code=model_cfg.trust_remote_code,
    )
    log(f"model {model_cfg.model}: {model.num_layers} layers, pooling {model.config.pooling}")
    train_stage1(model, tokenizer, data.encoded["train"], data.encoded["dev"], data.collate, cfg,
                 run_dir / "stage1", device=device, progress=progress)
    return model


def load_run_model(run_dir: str | Path, device: str = "auto") -> tuple[EarlyExitForSequenceClassification, PreparedData]:
    """The stage-1 model of a run and its data, tokenised with the run's own tokenizer and labels."""
    run_dir = Path(run_dir)
    data_cfg, _ = load_run_settings(run_dir)
    model_dir = stage1_model_dir(run_dir)
    model = EarlyExitForSequenceClassification.from_pretrained(model_dir, device=resolve_device(device))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = prepare_data(data_cfg, tokenizer, LabelList.load(run_dir))
    return model, data


def split_tables(model, data: PreparedData, split: str, *, batch_size: int = 128, progress: bool = True) -> ExitTables:
    device = next(model.parameters()).device
    return collect_exit_tables(model, data.encoded[split], data.collate, batch_size=batch_size, device=device,
                               progress=progress, desc=split)


def run_memorize(run_dir: str | Path, *, device: str = "auto", batch_size: int = 128, progress: bool = True,
                 log=print) -> torch.Tensor:
    """Memorized layers of the training set under the stage-1 model; writes JSON, PNG and prints a histogram."""
    from consistentee.evaluation.plots import plot_histogram

    run_dir = Path(run_dir)
    model, data = load_run_model(run_dir, device)
    tables = split_tables(model, data, "train", batch_size=batch_size, progress=progress)
    layers = memorized.memorized_layers(tables.predictions(), tables.labels)
    losses = memorized.final_exit_loss(tables.probs, tables.labels)
    path = memorized.save_memorized(run_dir, data.splits.train.ids, layers, model.num_layers, losses)
    plot_histogram(layers.numpy(), model.num_layers, "memorized layer of training examples",
                   run_dir / "memorized_layers.png")
    log(memorized.histogram_text(layers, model.num_layers))
    log(f"memorized layers written to {path} and {run_dir / 'memorized_layers.png'}")
    return layers


def run_evaluate(run_dir: str | Path, split: str = "test", *, device: str = "auto", batch_size: int = 128,
                 progress: bool = True, log=print) -> dict:
    """Accuracy of every exit on a split, written to ``eval_<split>.json``."""
    run_dir = Path(run_dir)
    model, data = load_run_model(run_dir, device)
    tables = split_tables(model, data, split, batch_size=batch_size, progress=progress)
    accuracy = tables.per_exit_accuracy()
    result = {"split": split, "examples": len(data.splits.splits()[split]), "per_exit_accuracy": accuracy,
              "last_exit_accuracy": accuracy[-1]}
    write_json(run_dir / f"eval_{split}.json", result)
    log(f"{split} accuracy per exit (%): " + " ".join(f"{100 * a:.2f}" for a in accuracy))
    return result
