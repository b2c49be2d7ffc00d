"""TFDS builders (array_record, no TensorFlow) over a user's own `.jsonl[.gz]` files.

One builder per record kind; our readers parse and validate every line during
the build, and their report (kept, skipped by reason, file:line examples) is
stored with the dataset in its `metadata.json` (`info.metadata["read_report"]`)
and printed.

    kind        builder              features (Text is str in, bytes out of tfds; `decode` gives str)
    "pairs"     jaxreward_pairs      prompt, chosen, rejected, subset ("" = none), source
    "feedback"  jaxreward_feedback   prompt, completion, source; label bool[]
    "prompts"   jaxreward_prompts    prompt, answer ("" = none), source
    "rated"     jaxreward_rated      prompt, response, source; ratings float32[K]

Text fields are after our parsing and chat rendering (`render_chat`), exactly
what the readers return; `source` is "file:line". A dataset lives in
`data_dir/jaxreward_<kind>/<name>/1.0.0/` and is loaded with
`load("<kind>/<name>", data_dir)` (or `tfds.data_source("jaxreward_<kind>/<name>", data_dir=...)`).

    builder, report = build("pairs", ["hh.jsonl.gz"], "/data/tfds", name="hh")
    source = load("pairs/hh", "/data/tfds")          # random access, len(source) == report.kept
    pairs = decode_all(source)                        # list[PreferencePair], tfds (shuffled) order
"""
import dataclasses
import hashlib
import json
import os
import pathlib
import re
from typing import Sequence

import jax
import numpy as np
import tensorflow_datasets as tfds

from jaxreward.data import records as records_lib
from jaxreward.errors import UserError
from jaxreward.data.preference import PreferencePair, ReadReport, read_preference_pairs
from jaxreward.data.records import FeedbackRecord, PromptRecord, RatedRecord

VERSION = "1.0.0"
REPORT_KEY = "read_report"


@dataclasses.dataclass
class BuildReport:
    """What a build read: one `ReadReport` per source file, plus fingerprints.

    `sources_sha256` hashes the kind, the files' names and bytes and the reader
    options (it decides whether an existing dataset is stale);
    `records_sha256` hashes the records in generation order (the dataset's
    identity for `pipeline.cached_tokenize`).
    """

    kind: str
    name: str
    files: list[ReadReport]
    sources_sha256: str = ""
    records_sha256: str = ""

    @property
    def kept(self) -> int:
        return sum(r.kept for r in self.files)

    @property
    def skipped(self) -> dict[str, int]:
        """label -> count over all files."""
        total: dict[str, int] = {}
        for report in self.files:
            for label, count in report.skipped.items():
                total[label] = total.get(label, 0) + count
        return total

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        head = f"{self.kind}/{self.name}: kept {self.kept}, skipped {self.num_skipped}"
        return "\n".join([head] + ["  " + r.summary() for r in self.files])

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, value: dict) -> "BuildReport":
        value = dict(value)
        value["files"] = [ReadReport(**r) for r in value["files"]]
        return cls(**value)


@dataclasses.dataclass(eq=False)
class JsonlConfig(tfds.core.BuilderConfig):
    """`paths`: the source files; `reader_kwargs`: passed to the kind's reader."""

    paths: tuple[str, ...] = ()
    reader_kwargs: dict = dataclasses.field(default_factory=dict)


class _JsonlBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base: reads `config.paths` with `READER`, writes one "train" split."""

    VERSION = tfds.core.Version(VERSION)
    KIND = ""
    # No download checksums file. (tfds looks for one beside the builder's
    # module, and on the way imports the `importlib_resources` backport,
    # which Python >= 3.9 does not install.)
    code_path = None
    READER = None

    def __init__(self, *, paths: Sequence = (), name: str = "default", reader_kwargs: dict | None = None,
                 config=None, **kwargs):
        """`paths` and `reader_kwargs` (e.g. fmt, on_error, render_chat, hh_as_chat,
        attributes) make the config named `name`; `kwargs` go to tfds (data_dir, ...).
        `file_format` defaults to array_record."""
        if config is None:
            paths = tuple(str(p) for p in ([paths] if isinstance(paths, (str, pathlib.Path)) else paths))
            config = JsonlConfig(name=name, version=self.VERSION, paths=paths,
                                 reader_kwargs=dict(reader_kwargs or {}),
                                 description=f"{self.KIND} read from {', '.join(paths)}")
        kwargs.setdefault("file_format", "array_record")
        super().__init__(config=config, **kwargs)

    def _features(self) -> dict:
        raise NotImplementedError

    def _example(self, record) -> dict:
        raise NotImplementedError

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(self._features()),
                                     metadata=tfds.core.MetadataDict())

    def sources_sha256(self) -> str:
        """Hash of kind, file names and bytes, and reader options (callables by identity: a
        bound `apply_chat_template` by its object's chat template, else by qualified name)."""
        digest = hashlib.sha256(self.KIND.encode())
        for path in self.builder_config.paths:
            digest.update(pathlib.Path(path).name.encode() + b"\0")
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        options = {k: _option_identity(v) for k, v in sorted(self.builder_config.reader_kwargs.items())}
        digest.update(json.dumps(options, sort_keys=True).encode())
        return digest.hexdigest()

    def _split_generators(self, dl_manager):
        del dl_manager
        config = self.builder_config
        if not config.paths:
            raise UserError(f"builder {self.name}/{config.name} has no source paths")
        on_error = config.reader_kwargs.get("on_error", "skip")
        records, reports = [], []
        for path in config.paths:
            got, report = type(self).READER(path, **config.reader_kwargs)
            records_lib.check_not_empty(report, path, on_error)
            records += got
            reports.append(report)
        report = BuildReport(self.KIND, config.name, reports, self.sources_sha256(), _records_sha256(records))
        print(report.summary())
        if not records:
            raise UserError(f"no valid records to build {self.name}/{config.name}:\n{report.summary()}")
        self.info.metadata[REPORT_KEY] = report.to_json()
        return {"train": self._generate_examples(records)}

    def _generate_examples(self, records):
        for i, record in enumerate(records):
            yield i, self._example(record)


class PairsBuilder(_JsonlBuilder):
    """Preference pairs via `read_preference_pairs` (fmt, on_error, render_chat, hh_as_chat)."""

    name = "jaxreward_pairs"
    KIND = "pairs"
    READER = staticmethod(read_preference_pairs)

    def _features(self):
        return {k: tfds.features.Text() for k in ("prompt", "chosen", "rejected", "subset", "source")}

    def _example(self, pair):
        return {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected,
                "subset": pair.subset or "", "source": pair.source}


class FeedbackBuilder(_JsonlBuilder):
    """Unpaired feedback via `records.read_feedback` (on_error, render_chat)."""

    name = "jaxreward_feedback"
    KIND = "feedback"
    READER = staticmethod(records_lib.read_feedback)

    def _features(self):
        features = {k: tfds.features.Text() for k in ("prompt", "completion", "source")}
        features["label"] = tfds.features.Tensor(shape=(), dtype=np.bool_)
        return features

    def _example(self, r):
        return {"prompt": r.prompt, "completion": r.completion, "label": r.label, "source": r.source}


class PromptsBuilder(_JsonlBuilder):
    """Prompts (+ optional answer) via `records.read_prompts` (on_error, render_chat); .txt too."""

    name = "jaxreward_prompts"
    KIND = "prompts"
    READER = staticmethod(records_lib.read_prompts)

    def _features(self):
        return {k: tfds.features.Text() for k in ("prompt", "answer", "source")}

    def _example(self, r):
        return {"prompt": r.prompt, "answer": r.answer or "", "source": r.source}


class RatedBuilder(_JsonlBuilder):
    """Rated responses via `records.read_rated`; needs `attributes` or `num_ratings` (K)."""

    name = "jaxreward_rated"
    KIND = "rated"
    READER = staticmethod(records_lib.read_rated)

    def _features(self):
        kwargs = self.builder_config.reader_kwargs
        k = len(kwargs["attributes"]) if kwargs.get("attributes") else kwargs.get("num_ratings")
        if not k:
            raise UserError("the rated builder needs attributes=(...) or num_ratings=K")
        features = {key: tfds.features.Text() for key in ("prompt", "response", "source")}
        features["ratings"] = tfds.features.Tensor(shape=(k,), dtype=np.float32)
        return features

    def _example(self, r):
        return {"prompt": r.prompt, "response": r.response, "source": r.source,
                "ratings": np.asarray(r.ratings, np.float32)}


BUILDERS = {b.KIND: b for b in (PairsBuilder, FeedbackBuilder, PromptsBuilder, RatedBuilder)}
_NAME = re.compile(r"[\w+\-.]+")  # a tfds config name (tensorflow_datasets.core.naming)


def build(kind: str, paths, data_dir, *, name: str = "default", overwrite: bool = False, **reader_kwargs):
    """Builds (or reuses) the dataset `kind/name` under `data_dir` from `paths`.

    Args:
      kind: "pairs", "feedback", "prompts" or "rated".
      paths: one path or a list of `.jsonl[.gz]` (prompts: also `.txt[.gz]`) files.
      data_dir: the TFDS data directory.
      name: the dataset's name (its builder config).
      overwrite: rebuild even when a dataset with this name exists.
      **reader_kwargs: for the kind's reader (fmt, on_error, render_chat,
        hh_as_chat, attributes, num_ratings).

    Returns:
      (builder, BuildReport): the prepared builder (`builder.as_data_source("train")`)
      and the report stored with the dataset.

    On several processes (`jax.process_count() > 1`, a pod) only process 0
    builds; the others wait for it at a barrier and read what it wrote, so
    `data_dir` must be a folder every process sees.

    Raises:
      DataError: a bad line with on_error="raise" (nothing is written).
      UserError (a ValueError): unknown kind, no valid record, or an existing
        dataset of this name built from other files/options (pass
        overwrite=True or another name).
    """
    if kind not in BUILDERS:
        raise UserError(f"kind must be one of {sorted(BUILDERS)}, got {kind!r}")
    if not isinstance(name, str) or not _NAME.fullmatch(name) or not name.strip("."):
        # tfds would write "a/b" to a subfolder and "" beside the configs, and load() neither
        raise UserError(f"dataset name {name!r} (data.tfds_name on the command line): use letters, "
                        "digits and _ + - . only")
    make = lambda: BUILDERS[kind](paths=paths, name=name, reader_kwargs=reader_kwargs,
                                  data_dir=os.path.expanduser(str(data_dir)))
    if jax.process_count() == 1:
        return _prepare(make(), overwrite)
    # Several processes (a pod) building one dataset in a shared data_dir would
    # write the same files at once. Process 0 builds it; the others wait at a
    # barrier, then read what it wrote. Process 0 reaches the barrier even when
    # its build fails (then it raises its error, and the others say so), so no
    # process waits forever.
    from jaxreward import parallel
    result = error = None
    if jax.process_index() == 0:
        try:
            result = _prepare(make(), overwrite)
        except Exception as e:  # noqa: BLE001 - raised again after the barrier
            error = e
    parallel.barrier(f"jaxreward tfds build {kind}/{name}")
    if error is not None:
        raise error
    if result is not None:
        return result
    builder = make()  # a fresh builder reads the dataset info process 0 wrote
    if not builder.is_prepared() or (
            BuildReport.from_json(builder.info.metadata[REPORT_KEY]).sources_sha256 != builder.sources_sha256()):
        raise UserError(f"{builder.data_path}: process {jax.process_index()} of {jax.process_count()} found no "
                        "dataset from these files after process 0 built it: see process 0's error, or give a "
                        "data_dir (data.tfds_data_dir) that every process reads (a shared filesystem)")
    return builder, BuildReport.from_json(builder.info.metadata[REPORT_KEY])


def _prepare(builder, overwrite: bool):
    """`build` in one process: reuse, refuse a stale dataset, or write it."""
    mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    if builder.is_prepared():
        stored = BuildReport.from_json(builder.info.metadata[REPORT_KEY])
        if overwrite:
            mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD
        elif stored.sources_sha256 != builder.sources_sha256():
            raise UserError(f"{builder.data_path} was built from other files or options; pass "
                            "overwrite=True or another name (from the command line: another "
                            "data.tfds_name, or delete that folder)")
        else:
            print(f"reusing {builder.data_path}:\n{stored.summary()}")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
    return builder, BuildReport.from_json(builder.info.metadata[REPORT_KEY])


def load(dataset: str, data_dir, split: str = "train"):
    """`tfds.data_source` of "kind/name" (e.g. "pairs/hh"): `len()`, `[i]` -> dict of
    bytes / numpy values (see module doc); `decode` turns a record into ours."""
    kind, _, name = dataset.partition("/")
    if kind not in BUILDERS or not name:
        raise UserError(f"dataset must be 'kind/name' with kind in {sorted(BUILDERS)}, got {dataset!r}")
    return tfds.data_source(f"{BUILDERS[kind].name}/{name}", data_dir=os.path.expanduser(str(data_dir)),
                            split=split)


def stored_report(source) -> BuildReport:
    """The `BuildReport` stored with the dataset of a data source from `load`."""
    return BuildReport.from_json(source.dataset_info.metadata[REPORT_KEY])


def decode(record: dict):
    """A data-source record -> PreferencePair | FeedbackRecord | PromptRecord | RatedRecord,
    text as str, `ratings` a tuple of floats, `label` a bool, empty subset/answer as None."""
    text = {k: (v.decode("utf-8") if isinstance(v, bytes) else v) for k, v in record.items()}
    if "chosen" in text:
        return PreferencePair(text["prompt"], text["chosen"], text["rejected"], text["source"],
                              text["subset"] or None)
    if "completion" in text:
        return FeedbackRecord(text["prompt"], text["completion"], bool(text["label"]), text["source"])
    if "ratings" in text:
        return RatedRecord(text["prompt"], text["response"], tuple(float(x) for x in text["ratings"]),
                           text["source"])
    return PromptRecord(text["prompt"], text["answer"] or None, text["source"])


def decode_all(source) -> list:
    """Every record of a data source, decoded, in the source's order."""
    return [decode(r) for r in source.__getitems__(range(len(source)))]


def _records_sha256(records) -> str:
    digest = hashlib.sha256()
    for r in records:
        digest.update(json.dumps(dataclasses.asdict(r), sort_keys=True).encode() + b"\n")
    return digest.hexdigest()


def _option_identity(value):
    template = getattr(getattr(value, "__self__", None), "chat_template", None)
    if template is not None:
        return "chat_template:" + hashlib.sha256(template.encode()).hexdigest()
    if callable(value):
        return getattr(value, "__module__", "") + "." + getattr(value, "__qualname__", repr(value))
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)
