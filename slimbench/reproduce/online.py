"""The online path of a reproduction: fetch what the headline needs before any cell runs.

With the hub on (``HF_HUB_OFFLINE=0``), ``reproduce NAME --budget paper`` first downloads every
hub model of the headline at its pinned revision (config, tokenizer, and one format of weights:
safetensors where the revision has them, else ``pytorch_model.bin``) and reads every data split
its tasks and calibration use, then runs the cells. A revision, repository, data-set config or
file the hub does not have, or a connection lost mid-download, stops it there with one error
naming what failed, before any record is written. Files that finished downloading stay in the
Hugging Face cache, so the same command again fetches only what is missing (a file cut off in
the middle starts over: huggingface_hub resumes a file only within one process). ``check`` asks
the hub the same questions without downloading (``--dry-run``).
"""

from __future__ import annotations

from collections.abc import Callable

from slimbench.errors import SuiteError
from slimbench.specs import ModelSpec
from slimbench.sweep.suite import Suite
from slimbench.zoo.hub import endpoint

CONFIG_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "tokenizer.model", "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json",
                "chat_template.jinja", "chat_template.json")
WEIGHT_FORMATS = (  # (single file, index of shards, shard pattern), in the order transformers prefers them
    ("model.safetensors", "model.safetensors.index.json", "model-*.safetensors"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"),
)


class HubUnavailable(SuiteError):
    """A model or data set the headline needs could not be fetched from the hub."""


def hub_models(suite: Suite) -> list[ModelSpec]:
    from slimbench.registry import MODELS

    return [m for m in suite.models if m.name not in MODELS and not m.name.startswith((".", "/", "~"))]


def data_needed(suite: Suite) -> list[tuple[str, str]]:
    """(corpus, split) pairs the suite's tasks evaluate on and its methods calibrate on."""
    needed = [(t.params["corpus"], t.params.get("split", "test")) for t in suite.tasks if "corpus" in t.params]
    needed += [(s.params["calib_corpus"], "calibration") for m in suite.methods for s in m.steps
               if "calib_corpus" in s.params]
    return list(dict.fromkeys(needed))


def files_to_fetch(name: str, revision: str, siblings: list[str]) -> list[str]:
    """The files a causal LM loads: config, tokenizer, and the first weight format the revision has."""
    names = set(siblings)
    for single, index, _pattern in WEIGHT_FORMATS:
        if index in names:
            import fnmatch

            shards = sorted(f for f in names if fnmatch.fnmatch(f, _pattern))
            weights = [index, *shards]
            break
        if single in names:
            weights = [single]
            break
    else:
        raise HubUnavailable(f"{name} at revision {revision} has no weights (model.safetensors or pytorch_model.bin); "
                             f"it has: {', '.join(sorted(names)) or 'no files'}")
    return [f for f in CONFIG_FILES if f in names] + weights


def model_failure(spec: ModelSpec, err: BaseException) -> str:
    """A download failure in words: what was asked, of which server, and what to do."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    rev = spec.revision or "main"
    where = f"{spec.name} at revision {rev} ({endpoint()})"
    if isinstance(err, RevisionNotFoundError):
        return f"{where}: the repository has no revision {rev!r}; pin a commit it has (`revision:` of the model)"
    if isinstance(err, GatedRepoError):
        return f"{where}: a gated repository; accept its licence on the hub and log in (`hf auth login`)"
    if isinstance(err, RepositoryNotFoundError):
        return f"{where}: no such repository (or it is private: log in with `hf auth login`)"
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if _is_connection_error(err) or isinstance(err, LocalEntryNotFoundError):
        return (f"{where}: the download stopped ({type(err).__name__}: {text}). Nothing was recorded; the files "
                "that finished are kept in the Hugging Face cache, so the same command again downloads only the rest")
    if isinstance(err, HfHubHTTPError) and err.response is not None:
        return f"{where}: the server answered {err.response.status_code} ({text})"
    return f"{where}: {type(err).__name__}: {text}"


def _is_connection_error(err: BaseException) -> bool:
    seen = err
    while seen is not None:
        if type(seen).__name__ in ("ConnectError", "ReadError", "RemoteProtocolError", "TimeoutException",
                                   "ConnectTimeout", "ReadTimeout", "ConnectionError"):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def fetch_model(spec: ModelSpec, log: Callable[[str], None], *, download: bool = True) -> str:
    """Download the model's files at its revision (or, ``download=False``, only check the revision
    exists); returns the commit the revision resolved to."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        info = HfApi().model_info(spec.name, revision=spec.revision, files_metadata=True)
        siblings = {s.rfilename: s.size for s in info.siblings or []}
        files = files_to_fetch(spec.name, spec.revision or "main", list(siblings))
        if not download:
            return info.sha
        sizes = [siblings[f] for f in files if siblings[f] is not None]
        size = f", {sum(sizes) / 1e6:,.1f} MB" if len(sizes) == len(files) else ""
        log(f"fetching {spec.name} at {info.sha} ({len(files)} files{size})")
        snapshot_download(spec.name, revision=info.sha, allow_patterns=files)
        return info.sha
    except HubUnavailable:
        raise
    except Exception as err:  # huggingface_hub and httpx raise many types; one line says what failed
        raise HubUnavailable(model_failure(spec, err), source="reproduce", field="headline.suite.models") from None


def fetch_data(corpus: str, split: str, log: Callable[[str], None]) -> str:
    """Read the split (downloading it at the corpus' pinned revision); returns where it came from."""
    from slimbench.registry import CORPORA

    try:
        docs = CORPORA.get(corpus).documents(split)
    except Exception as err:  # DataError already says which data set, config and revision
        raise HubUnavailable(f"corpus {corpus!r} split {split!r}: {err}", source="reproduce") from None
    log(f"data {corpus}/{split}: {len(docs):,} documents")
    return corpus


def prefetch(suite: Suite, log: Callable[[str], None]) -> dict[str, str]:
    """Everything the suite needs from the hub, fetched now; {model: commit}. Raises HubUnavailable."""
    commits = {m.name: fetch_model(m, log) for m in hub_models(suite)}
    for corpus, split in data_needed(suite):
        fetch_data(corpus, split, log)
    return commits


def check(suite: Suite) -> list[str]:
    """What the hub lacks for the suite, asked without downloading weights or data (a dry run)."""
    problems = []
    for m in hub_models(suite):
        try:
            fetch_model(m, lambda s: None, download=False)
        except HubUnavailable as err:
            problems.append(str(err))
    problems += data_problems(suite)
    return problems


def data_problems(suite: Suite) -> list[str]:
    from huggingface_hub import HfApi

    from slimbench.zoo.datasets import standard_corpora as sc

    problems = []
    for corpus, split in data_needed(suite):
        if corpus not in sc.SOURCES or sc.local_file(corpus, split) is not None:
            continue
        try:
            src, rev = sc.hub_source(corpus, split)
            info = HfApi().dataset_info(src.dataset, revision=rev)
            files = {s.rfilename for s in info.siblings or []}
            if src.data_files and src.data_files not in files:
                problems.append(f"corpus {corpus!r} split {split!r}: {src.dataset} at revision {rev} has no file "
                                f"{src.data_files!r}")
        except Exception as err:  # reported, not raised: a dry run lists every problem
            problems.append(f"corpus {corpus!r} split {split!r}: {type(err).__name__}: {str(err).splitlines()[0]}")
    return problems
