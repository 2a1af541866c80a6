"""Meta-trained weights: find a checkpoint, fetch it from the Hub, verify it, write one.

A checkpoint is a folder holding ``config.json`` and the ``.safetensors`` files it lists,
each with its sha256. config.json is the root of trust: every weights file is checked
against it whenever a checkpoint is loaded, wherever it came from (a local folder, the
Hugging Face Hub cache, or the copy shipped inside the package). See docs/weights.md.

Nothing here imports torch, so ``metad2a search`` can start (and fail) fast; the
huggingface_hub imports are done inside the Hub functions because they are slow.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..atomic import atomic_paths
from ..errors import UserError

FORMAT_VERSION = 1
DEFAULT_REPO = "metad2a/metad2a-nb201"
CONFIG_NAME = "config.json"
HUB_SCHEME = "hf://"
PACKAGED_CHECKPOINT = "nb201"  # the folder under weights/ that the package ships

REQUIRED_SECTIONS = ("model", "encoder", "database", "metrics")
ENCODER_FIELDS: dict[str, type] = {"identity": str, "resolution": int, "feature_dim": int}

# One look at the Hub may take this long before we call it unreachable. huggingface_hub's
# own default is 10 s per request with minutes of retries; a search must not wait that long
# when a shipped copy of the weights could answer at once.
HUB_TIMEOUT_S = 3.0
UNREACHABLE_MESSAGE = "Hub unreachable; using the weights shipped with metad2a"

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
# A weights file name is a plain name: it becomes a path in a folder and in a Hub URL.
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\.safetensors$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_TRUE = {"1", "ON", "YES", "TRUE"}  # the values huggingface_hub reads as "on"


class HubUnavailable(UserError):
    """The Hub could not be asked (no connection, timeout, offline mode) and the cache
    does not hold the checkpoint. The default weights fall back to the shipped copy on it."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class HubRepoMissing(UserError):
    """The Hub answered that the repository or revision does not exist (or is private)."""


# --- the checkpoint and its config ---------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint folder. ``source`` is "local", "hub" or "packaged"."""

    path: Path
    config: dict[str, Any]
    source: str

    @property
    def name(self) -> str:
        return self.config["name"]

    @property
    def files(self) -> list[str]:
        return list(self.config["files"])

    def file(self, name: str) -> Path:
        """The path of a weights file listed in config.json."""
        if name not in self.config["files"]:
            listed = ", ".join(self.files)
            raise UserError(f"checkpoint {self.path} has no weights file {name!r} (it lists {listed})")
        return self.path / name

    def arrays(self, name: str) -> dict[str, Any]:
        """The tensors of one weights file as numpy arrays (safetensors: no pickle, no torch)."""
        from safetensors.numpy import load_file

        return load_file(str(self.file(name)))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_config_file(path: Path) -> dict[str, Any]:
    """Read config.json and check its structure (not yet the files it lists)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise UserError(f"{path.parent} is not a metad2a checkpoint: it has no {CONFIG_NAME}") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is damaged: not valid JSON ({err})") from err
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from err
    return validate_config(data, where=str(path))


def validate_config(data: Any, *, where: str = CONFIG_NAME) -> dict[str, Any]:
    """Check a parsed config.json; return it unchanged, or raise UserError naming ``where``."""
    if not isinstance(data, dict):
        raise UserError(f"{where} is damaged: expected a JSON object")
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise UserError(f"{where} has no integer format_version; it is not a metad2a checkpoint")
    if version > FORMAT_VERSION:
        raise UserError(
            f"{where} has format_version {version}, newer than this metad2a reads "
            f"({FORMAT_VERSION}); upgrade metad2a"
        )
    if version != FORMAT_VERSION:
        raise UserError(f"{where} has format_version {version}; this metad2a reads only {FORMAT_VERSION}")
    if not isinstance(data.get("name"), str) or not data["name"]:
        raise UserError(f"{where} is missing the checkpoint 'name'")
    for section in REQUIRED_SECTIONS:
        if not isinstance(data.get(section), dict):
            raise UserError(f"{where} is missing the '{section}' section")
    _validate_encoder(data["encoder"], where)
    _validate_files(data.get("files"), where)
    return data


def _validate_encoder(encoder: dict[str, Any], where: str) -> None:
    for key, kind in ENCODER_FIELDS.items():
        value = encoder.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise UserError(f"{where}: encoder.{key} must be a {kind.__name__}")


def _validate_files(files: Any, where: str) -> None:
    if not isinstance(files, dict) or not files:
        raise UserError(f"{where} lists no weights files under 'files'")
    for name, digest in files.items():
        if not _FILE_NAME.match(name):
            raise UserError(f"{where} lists {name!r}; a weights file must be a plain *.safetensors name")
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise UserError(f"{where}: the sha256 of {name} must be 64 lowercase hex digits")


def verify_file(path: Path, expected_sha256: str) -> None:
    """Raise UserError unless ``path`` exists and its sha256 is ``expected_sha256``."""
    if not path.is_file():
        raise UserError(f"checkpoint {path.parent} is missing {path.name}, which config.json lists")
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise UserError(
            f"{path.name} in {path.parent} does not match config.json "
            f"(sha256 {actual[:12]}…, expected {expected_sha256[:12]}…); it is damaged or was changed"
        )


def load_checkpoint_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate ``folder/config.json`` and verify every file it lists."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"checkpoint folder {folder} does not exist")
    config = read_config_file(folder / CONFIG_NAME)
    for name, digest in config["files"].items():
        verify_file(folder / name, digest)
    return config


def check_encoder(config: Mapping[str, Any], identity: str, *, resolution: int | None = None) -> None:
    """Refuse weights meta-trained on another image encoder: their embeddings mean nothing here."""
    expected = config["encoder"]
    same = expected["identity"] == identity and resolution in (None, expected["resolution"])
    if not same:
        used = identity if resolution is None else f"{identity} at resolution {resolution}"
        raise UserError(
            f"these weights expect encoder {expected['identity']} at resolution "
            f"{expected['resolution']}; this metad2a uses {used}"
        )


# --- writing a checkpoint ------------------------------------------------------------


def write_checkpoint(
    folder: str | os.PathLike[str],
    config: Mapping[str, Any],
    tensors: Mapping[str, Mapping[str, Any]],
) -> Checkpoint:
    """Write ``tensors`` (file name -> {tensor name: array}) and config.json into ``folder``.

    config's "files" is filled in with the hashes of what is written. All files are moved
    into place together at the end, config.json last, so a reader never sees a config that
    lists a file not yet there. Arrays may be numpy arrays or (if the caller uses torch)
    CPU torch tensors.
    """
    from safetensors.numpy import save

    folder = Path(folder)
    payloads = {name: save(_as_numpy_dict(arrays)) for name, arrays in tensors.items()}
    full = dict(config)
    full.setdefault("format_version", FORMAT_VERSION)
    full["files"] = {name: hashlib.sha256(data).hexdigest() for name, data in payloads.items()}
    validate_config(full, where=f"the config for {folder}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {folder}: {err.strerror}") from err
    targets = [folder / name for name in payloads] + [folder / CONFIG_NAME]
    with atomic_paths(*targets) as temps:
        for temp, data in zip(temps, payloads.values()):
            temp.write_bytes(data)
        temps[-1].write_text(json.dumps(full, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return Checkpoint(path=folder, config=load_checkpoint_config(folder), source="local")


def _as_numpy_dict(arrays: Mapping[str, Any]) -> dict[str, Any]:
    import numpy as np

    return {key: np.ascontiguousarray(_as_numpy(value)) for key, value in arrays.items()}


def _as_numpy(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.ndarray):
        return value
    # Look torch up only if the caller already imported it: this module must not.
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    raise TypeError(f"expected a numpy array or a torch tensor, got {type(value).__name__}")


# --- where the weights come from -----------------------------------------------------


def packaged_weights_dir() -> Path:
    """The checkpoint folder shipped inside the package (it may not exist yet)."""
    shipped = resources.files("metad2a_cli") / "_weights"
    if shipped.is_dir():
        return Path(str(shipped)) / PACKAGED_CHECKPOINT
    # A source checkout (or an editable install made before weights/ was mapped into the
    # package) has the folder at the top of the repository instead.
    return Path(__file__).resolve().parents[3] / "weights" / PACKAGED_CHECKPOINT


def resolve_weights(spec: str | None, *, log: Callable[[str], None] = lambda line: None) -> Checkpoint:
    """Find and verify the checkpoint that ``spec`` names.

    ``spec`` is a local checkpoint folder, or ``hf://ORG/REPO[@REVISION]``, or None for the
    default: DEFAULT_REPO on the Hub, falling back to the shipped copy (said in one line
    through ``log``) when the Hub cannot be reached.
    """
    if spec is None:
        return _default_weights(log)
    folder = Path(spec).expanduser()
    if folder.is_dir():
        return Checkpoint(path=folder, config=load_checkpoint_config(folder), source="local")
    if spec.startswith(HUB_SCHEME):
        return fetch_from_hub(HubRef.parse(spec), HubSettings.from_env())
    if folder.exists():
        raise UserError(f"weights {spec} is a file; give the checkpoint folder that holds config.json")
    raise UserError(f"weights {spec!r}: no such folder; give a checkpoint folder or hf://ORG/REPO[@REVISION]")


def _default_weights(log: Callable[[str], None]) -> Checkpoint:
    try:
        return fetch_from_hub(HubRef(DEFAULT_REPO, None), HubSettings.from_env())
    except HubUnavailable as err:
        why, line = err, f"{UNREACHABLE_MESSAGE} ({err.reason})"
    except HubRepoMissing as err:
        why, line = err, f"{DEFAULT_REPO} is not on the Hub; using the weights shipped with metad2a"
    packaged = packaged_weights_dir()
    if not (packaged / CONFIG_NAME).is_file():
        raise UserError(
            f"no meta-trained weights: {why}, and this metad2a ships none; give --weights PATH "
            "(a checkpoint folder) or --weights hf://ORG/REPO, or make some with `metad2a train`"
        ) from why
    log(line)
    return Checkpoint(path=packaged, config=load_checkpoint_config(packaged), source="packaged")


# --- the Hub -------------------------------------------------------------------------


@dataclass(frozen=True)
class HubRef:
    """``hf://ORG/REPO[@REVISION]``: a Hub model repository and, optionally, a revision."""

    repo_id: str
    revision: str | None

    @classmethod
    def parse(cls, spec: str) -> HubRef:
        body = spec.removeprefix(HUB_SCHEME)
        repo_id, at, revision = body.partition("@")
        if not _REPO_ID.match(repo_id) or (at and not revision.strip()):
            raise UserError(f"{spec!r} is not hf://ORG/REPO or hf://ORG/REPO@REVISION")
        return cls(repo_id=repo_id, revision=revision or None)

    def __str__(self) -> str:
        return f"{HUB_SCHEME}{self.repo_id}" + (f"@{self.revision}" if self.revision else "")


@dataclass(frozen=True)
class HubSettings:
    """Where and how to talk to the Hub, read from the environment at call time.

    huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE once, when it is first
    imported; reading them per call (with its precedence) lets a changed environment count.
    """

    endpoint: str
    cache_dir: Path
    offline: bool
    timeout_s: float

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> HubSettings:
        env = os.environ if environ is None else environ
        offline = any(env.get(key, "").upper() in _TRUE for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
        return cls(
            endpoint=(env.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/"),
            cache_dir=_hub_cache_dir(env),
            offline=offline,
            timeout_s=_timeout(env.get("HF_HUB_ETAG_TIMEOUT")),
        )


def _timeout(value: str | None) -> float:
    # A user's HF_HUB_ETAG_TIMEOUT may shorten our wait, never lengthen it past HUB_TIMEOUT_S.
    try:
        asked = float(value) if value else HUB_TIMEOUT_S
    except ValueError:
        return HUB_TIMEOUT_S
    return min(asked, HUB_TIMEOUT_S) if asked > 0 else HUB_TIMEOUT_S


def _hub_cache_dir(env: Mapping[str, str]) -> Path:
    # huggingface_hub's order: HF_HUB_CACHE, the legacy HUGGINGFACE_HUB_CACHE, HF_HOME/hub,
    # then $XDG_CACHE_HOME (or ~/.cache)/huggingface/hub.
    explicit = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return _expand(explicit)
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return _expand(home) / "hub"


def _expand(path: str) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(path)))


def fetch_from_hub(ref: HubRef, settings: HubSettings) -> Checkpoint:
    """Download (or take from huggingface_hub's cache) and verify the checkpoint ``ref``.

    config.json comes first, at the requested revision; the files it lists then come from
    that same commit, so a push between the two cannot mix checkpoints. Each file is
    checked against config.json's sha256, and one that fails is removed from the cache.
    """
    from huggingface_hub import constants

    # huggingface_hub reads HF_HUB_OFFLINE once, at import; this call's environment decides.
    constants.HF_HUB_OFFLINE = settings.offline
    revision = ref.revision or "main"
    reason = _offline_reason(ref, settings)
    config_path = _hub_file(ref, CONFIG_NAME, revision, settings, offline_reason=reason)
    try:
        config = read_config_file(config_path)
    except UserError as err:
        _evict(config_path)
        raise UserError(f"{ref}: {err}") from err
    commit = config_path.parent.name  # the snapshot folder is named after the commit
    for name, digest in config["files"].items():
        path = _hub_file(ref, name, commit, settings, offline_reason=reason)
        try:
            verify_file(path, digest)
        except UserError as err:
            # Never leave a file that failed its check in the cache: the next run would
            # find it there (offline too) instead of fetching a good copy.
            _evict(path)
            raise UserError(
                f"{name} from {ref} does not match the sha256 in its config.json "
                "(damaged download or tampered file); it was removed from the cache"
            ) from err
    return Checkpoint(path=config_path.parent, config=config, source="hub")


def _offline_reason(ref: HubRef, settings: HubSettings) -> str | None:
    """Why the Hub will not be asked this time, or None if it will be."""
    if settings.offline:
        return "HF_HUB_OFFLINE is set"
    if _pinned_and_cached(ref, settings):
        return "the pinned commit is cached"  # a commit never changes: nothing to ask
    return _probe_hub(ref, settings)


def _pinned_and_cached(ref: HubRef, settings: HubSettings) -> bool:
    """Whether ``ref`` names a commit whose config.json and listed files are all cached."""
    from huggingface_hub import try_to_load_from_cache

    if ref.revision is None or not _COMMIT.match(ref.revision):
        return False

    def cached(filename: str) -> Path | None:
        found = try_to_load_from_cache(ref.repo_id, filename, cache_dir=settings.cache_dir, revision=ref.revision)
        return Path(found) if isinstance(found, str) else None

    config_path = cached(CONFIG_NAME)
    if config_path is None:
        return False
    try:
        listed = read_config_file(config_path)["files"]
    except UserError:
        return False  # let the download path fetch (and judge) it again
    return all(cached(name) is not None for name in listed)


def _probe_hub(ref: HubRef, settings: HubSettings) -> str | None:
    """One quick HEAD on config.json: None if the Hub answers, else why it is unreachable.

    hf_hub_download retries an unreachable Hub for about half a minute before it gives up
    when the file is not cached; asking once first, with a short timeout and no retry,
    lets us go straight to the cache (or the shipped copy) instead.
    """
    import httpx2  # huggingface_hub 2.x talks HTTP through httpx2
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
    )

    url = hf_hub_url(ref.repo_id, CONFIG_NAME, revision=ref.revision, endpoint=settings.endpoint)
    try:
        metadata = get_hf_file_metadata(url, timeout=settings.timeout_s, endpoint=settings.endpoint)
    except OfflineModeIsEnabled:
        return "HF_HUB_OFFLINE is set"
    except httpx2.TimeoutException:
        return f"no answer from {settings.endpoint} within {settings.timeout_s:g} s"
    except httpx2.TransportError as err:
        return f"cannot connect to {settings.endpoint}: {type(err).__name__}"
    except EntryNotFoundError as err:
        raise UserError(f"{ref} has no {CONFIG_NAME}; is it a metad2a checkpoint?") from err
    except HfHubHTTPError as err:
        _raise_if_missing(ref, err)
        status = err.response.status_code if err.response is not None else None
        if status is not None and (status >= 500 or status in (408, 429)):
            return f"{settings.endpoint} answered HTTP {status}"
        raise UserError(f"{ref}: the Hub refused config.json ({_first_line(err)})") from err
    if metadata.commit_hash is None:
        return f"{settings.endpoint} does not answer like a Hugging Face Hub"
    return None


def _hub_file(ref: HubRef, filename: str, revision: str, settings: HubSettings, *, offline_reason: str | None) -> Path:
    """hf_hub_download one file into the cache (or find it there when offline)."""
    import httpx2
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
    )

    try:
        return Path(
            hf_hub_download(
                ref.repo_id,
                filename,
                revision=revision,
                cache_dir=settings.cache_dir,
                endpoint=settings.endpoint,
                local_files_only=offline_reason is not None,
                etag_timeout=settings.timeout_s,
            )
        )
    except LocalEntryNotFoundError as err:
        reason = offline_reason or "the Hub cannot be reached"
        raise HubUnavailable(
            f"cannot get {ref}: {reason}, and the cache {settings.cache_dir} holds no copy of its {filename}",
            reason=reason,
        ) from err
    except EntryNotFoundError as err:
        raise UserError(f"{ref} has no {filename}; is it a metad2a checkpoint?") from err
    except HfHubHTTPError as err:
        _raise_if_missing(ref, err)
        raise UserError(f"downloading {filename} from {ref} failed: {_first_line(err)}") from err
    except (OSError, httpx2.TransportError) as err:
        # A download that broke off or came out the wrong size: huggingface_hub has already
        # dropped the partial file, so nothing unverified is left in the cache.
        raise UserError(f"downloading {filename} from {ref} failed: {_first_line(err)}") from err


def _raise_if_missing(ref: HubRef, err: Exception) -> None:
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(err, RevisionNotFoundError):
        raise HubRepoMissing(f"{ref.repo_id} has no revision {ref.revision!r} on the Hub") from err
    if isinstance(err, RepositoryNotFoundError):
        raise HubRepoMissing(f"no Hub repository {ref.repo_id} (or it is private or gated)") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def _evict(snapshot_file: Path) -> None:
    """Remove a file from huggingface_hub's cache: the snapshot entry and the blob behind it."""
    blob = snapshot_file.resolve()
    for path in (snapshot_file, blob):
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass  # best effort: every load verifies the hashes again anyway
