"""``diffuseg push``: upload a dataset folder to the Hugging Face Hub, resumably.

The folder is checked first (:func:`diffuseg.data.check_dataset_folder`): an unfinished or
inconsistent dataset is never uploaded. The upload goes through huggingface_hub's resumable
large-folder upload (``HfApi.upload_large_folder``; in huggingface_hub >= 2, whose
``upload_folder`` is the same streamed, multi-commit, resumable upload, that one). The
token comes from the usual huggingface_hub mechanisms (``HF_TOKEN``, ``hf auth login``)
and is never printed or written by diffuseg.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from diffuseg.data import STATE_DIR, split_files

HELP = "upload a dataset folder to the Hugging Face Hub (resumable)"
"""The command's line in ``diffuseg --help``."""


@dataclass
class UploadPlan:
    """What :func:`push_dataset` would send: files relative to the folder, with sizes in bytes."""

    folder: Path
    repo_id: str
    private: bool
    files: list[tuple[str, int]]
    rows: dict[str, int]
    left_out: list[str]
    """Entries of the folder that are not part of the dataset layout, hence not uploaded."""

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def describe(self) -> str:
        splits = ", ".join(f"{split}: {n} rows" for split, n in self.rows.items())
        lines = [
            f"upload {self.folder} -> dataset repo {self.repo_id} ({'private' if self.private else 'public'}); {splits}",
            f"{len(self.files)} files, {self.total_bytes / 1e6:.1f} MB:",
            *[f"  {path}  ({size} bytes)" for path, size in self.files],
        ]
        if self.left_out:
            shown = ", ".join(self.left_out[:10]) + (", ..." if len(self.left_out) > 10 else "")
            lines.append(f"not uploaded (not part of the dataset layout): {shown}")
        return "\n".join(lines)


def plan_upload(folder: str | os.PathLike, repo_id: str, private: bool = False) -> UploadPlan:
    """Check ``folder`` and list what would be uploaded (no network).

    Only what the dataset layout defines goes up: ``README.md``, ``id2label.json`` and the
    ``data/<split>-NNNNN-of-NNNNN.parquet`` shards, each a regular file inside the folder.
    Anything else (a ``.env``, notes) stays and is named in the plan; the writer's ``.diffuseg/``
    state stays too.

    Raises:
        ValueError: the folder is not a complete, valid dataset, one of its dataset files is a
            symbolic link, or ``repo_id`` is malformed.
        FileNotFoundError: the folder does not exist.
    """
    from diffuseg.data import check_dataset_folder

    if repo_id.count("/") > 1 or not repo_id.strip("/") or " " in repo_id:
        raise ValueError(f"--repo must look like 'name' or 'owner/name', got {repo_id!r}")
    folder = Path(folder)
    rows = check_dataset_folder(folder)
    names = ["README.md", "id2label.json", *(str(p.relative_to(folder)) for ps in split_files(folder).values() for p in ps)]
    links = [name for name in ["data", *names] if (folder / name).is_symlink()]
    if links:
        # A link may point anywhere on this machine (keys, /etc/shadow): never follow one out of the folder.
        raise ValueError(f"{folder} holds symbolic links where dataset files belong ({', '.join(links)}); "
                         "replace them with the files themselves")
    files = sorted((name, (folder / name).stat().st_size) for name in names)
    wanted = set(names) | {"data", STATE_DIR, ".cache", ".git"}  # the last three: writer, upload and git state
    left_out = sorted(
        str(p.relative_to(folder)) + ("/" if p.is_dir() and not p.is_symlink() else "")
        for p in [*folder.iterdir(), *((folder / "data").iterdir())]
        if str(p.relative_to(folder)) not in wanted
    )
    return UploadPlan(folder, repo_id, private, files, rows, left_out)


def push_dataset(plan: UploadPlan, revision: str | None = None) -> str:
    """Upload ``plan.folder`` to the Hub dataset repo ``plan.repo_id`` (resumable); return its URL.

    Rerunning after an interruption continues: files already committed are skipped.

    Raises:
        ValueError: offline mode is on, or no token is available.
    """
    import huggingface_hub
    from huggingface_hub import HfApi

    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise ValueError("HF_HUB_OFFLINE is set: cannot push; unset it (the folder is valid, see --dry-run)")
    if huggingface_hub.get_token() is None:
        raise ValueError("no Hugging Face token found: run `hf auth login` or set HF_TOKEN, then rerun")
    api = HfApi()
    allow = [path for path, _ in plan.files]  # exactly the planned files, matched literally
    if hasattr(api, "upload_large_folder"):
        api.upload_large_folder(
            repo_id=plan.repo_id,
            folder_path=plan.folder,
            repo_type="dataset",
            revision=revision,
            private=plan.private,
            allow_patterns=allow,
        )
    else:  # huggingface_hub >= 2 merged the large-folder upload into upload_folder
        api.create_repo(plan.repo_id, repo_type="dataset", private=plan.private, exist_ok=True)
        api.upload_folder(
            repo_id=plan.repo_id,
            folder_path=plan.folder,
            repo_type="dataset",
            revision=revision,
            allow_patterns=allow,
            commit_message="Upload dataset with diffuseg",
        )
    return f"https://huggingface.co/datasets/{plan.repo_id}"


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "push",
        help=HELP,
        description=(
            "Check a dataset folder written by `diffuseg generate` and upload it to a Hub dataset repo with "
            "huggingface_hub's resumable large-folder upload; rerun the same command to resume. The token comes "
            "from HF_TOKEN or `hf auth login` and is never printed. Only the dataset's own files go up (README.md, "
            "id2label.json, data/ shards; never a symbolic link); --dry-run lists them and what stays."
        ),
    )
    parser.add_argument("folder", metavar="FOLDER", help="the dataset folder")
    parser.add_argument("--repo", required=True, metavar="ID", help="dataset repo id, 'owner/name' (created if needed)")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", metavar="BRANCH", help="branch to push to (default: main)")
    parser.add_argument("--dry-run", action="store_true", help="check the folder and print the upload plan; no network")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    plan = plan_upload(args.folder, args.repo, args.private)
    print(plan.describe())
    if args.dry_run:
        return 0
    print(f"uploaded: {push_dataset(plan, args.revision)}")
    return 0
