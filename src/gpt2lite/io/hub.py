"""Finding files (a local path, or a Hugging Face hub repo) and publishing them, through ``huggingface_hub``.

All network access of the library goes through here, so the hub's cache,
revision pinning and ``HF_HUB_OFFLINE`` work as they do everywhere else.
"""

from __future__ import annotations

import os
from pathlib import Path

from gpt2lite.errors import ModelNotFoundError

__all__ = ["HUB_ALIASES", "push_to_hub", "resolve_files"]

# The short names GPT-2 was published under, and where they live on the hub now.
HUB_ALIASES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}


def resolve_files(
    name_or_path: str | os.PathLike[str],
    candidates: list[tuple[str, ...]],
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    what: str = "files",
) -> tuple[Path, ...]:
    """Return local paths of the first group of ``candidates`` present in a directory or hub repo.

    Each candidate is a tuple of file names that must all be there (for
    example ``("vocab.json", "merges.txt")``).
    """
    path = Path(name_or_path).expanduser()
    wanted = " or ".join(" + ".join(group) for group in candidates)
    if path.is_dir():
        for group in candidates:
            if all((path / f).is_file() for f in group):
                return tuple(path / f for f in group)
        raise ModelNotFoundError(f"directory {str(path)!r} holds no {what}: looked for {wanted}")
    if path.exists() or _looks_like_path(str(name_or_path)):
        raise ModelNotFoundError(
            f"{str(name_or_path)!r} is not a directory holding {what} ({wanted})"
            + ("" if path.exists() else "; no such file or directory")
        )
    repo_id = HUB_ALIASES.get(str(name_or_path), str(name_or_path))
    # An unreachable hub costs huggingface_hub ~25 s of retries per file: probe once, then use the cache only.
    unreachable = None if local_files_only else _unreachable()
    errors = []
    for group in candidates:
        try:
            return tuple(
                _hub_download(repo_id, f, revision=revision, cache_dir=cache_dir,
                              local_files_only=local_files_only or unreachable is not None, unreachable=unreachable)
                for f in group
            )
        except _MissingFile as exc:
            errors.append(str(exc))
    raise ModelNotFoundError(f"hub repo {repo_id!r} holds no {what}: looked for {wanted} ({'; '.join(errors)})")


class _MissingFile(Exception):
    pass


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else can only be meant as a path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def _unreachable() -> str | None:
    """Why the hub cannot be reached (a DNS failure, a refused connection, a timeout), or None when it answers."""
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=5)  # any answer, even an error status, is an answer
    except Exception as exc:  # the HTTP client's connection errors share no public base class
        return str(exc) or type(exc).__name__
    return None


def _hub_download(
    repo_id: str, filename: str, *, revision: str | None, cache_dir: str | os.PathLike[str] | None,
    local_files_only: bool, unreachable: str | None = None,
) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(
            hf_hub_download(
                repo_id, filename, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                library_name="gpt2lite",
            )
        )
    except LocalEntryNotFoundError:
        if unreachable is not None:
            raise ModelNotFoundError(
                f"the Hugging Face hub could not be reached ({unreachable}) and {filename!r} of {repo_id!r} is not "
                "in the local hub cache. Fix: connect once to download it, or pass the path of a local directory "
                "holding the files."
            ) from None
        # Raised both offline and when the hub could not be reached: the file is not cached.
        raise ModelNotFoundError(
            f"{filename!r} of {repo_id!r} is not in the local hub cache and the hub could not be reached "
            "(offline, HF_HUB_OFFLINE=1 or local_files_only). Fix: connect once to download it, "
            "or pass the path of a local directory holding the files."
        ) from None
    except EntryNotFoundError:
        raise _MissingFile(f"{filename!r} not found") from None
    except GatedRepoError:
        raise ModelNotFoundError(
            f"hub repo {repo_id!r} is gated: accept its terms on the hub and log in (`hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"no hub repo {repo_id!r} (or it is private): check the name, or pass a local directory"
        ) from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"hub repo {repo_id!r} has no revision {revision!r}") from None
    except HFValidationError as exc:
        raise ModelNotFoundError(
            f"{repo_id!r} is neither an existing local path nor a valid hub repo id ({exc})"
        ) from None


def push_to_hub(
    directory: str | os.PathLike[str], repo_id: str, *, token: str | None = None, private: bool = False,
    commit_message: str = "Upload with gpt2lite", api: object | None = None,
) -> str:
    """Upload a saved model folder to a hub repo (made if missing); return the repo's URL.

    The folder is uploaded as it is: weights, config, tokenizer files and its
    ``README.md`` model card (the trainer writes one; a folder without gets a short
    one naming its files). ``token`` defaults to the one ``hf auth login`` saved.
    ``api`` is an ``HfApi``-like object (for tests); by default ``huggingface_hub.HfApi()``.
    """
    from huggingface_hub import HfApi

    directory = Path(directory)
    if not (directory / "config.json").is_file() and not (directory / "adapter_config.json").is_file():
        raise ModelNotFoundError(f"{str(directory)!r} holds no saved model (config.json or adapter_config.json)")
    if not (directory / "README.md").is_file():
        files = ", ".join(sorted(p.name for p in directory.iterdir() if p.is_file()))
        (directory / "README.md").write_text(
            f"---\nlibrary_name: transformers\ntags: [gpt2, text-generation, gpt2lite]\n---\n\n# {repo_id}\n\n"
            f"A GPT-2 model saved by gpt2lite ({files}).\n", encoding="utf-8")
    hub = api if api is not None else HfApi()
    url = hub.create_repo(repo_id, token=token, private=private, exist_ok=True)  # type: ignore[attr-defined]
    hub.upload_folder(repo_id=repo_id, folder_path=str(directory), token=token,  # type: ignore[attr-defined]
                      commit_message=commit_message)
    return str(url)
