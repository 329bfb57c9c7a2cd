"""`gmt-mlx push`: upload an exported model (or a run's model/) to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from gmt_mlx.cli.common import echo, user_errors


@user_errors
def push(
    folder: Annotated[
        Path, typer.Argument(metavar="FOLDER", help="An exported model folder (gmt-mlx export) or a run directory.")
    ],
    repo: Annotated[str, typer.Option("--repo", help="Hub repo to create if needed and upload to: user/name.")],
    private: Annotated[
        bool, typer.Option("--private", help="Create the repo private (an existing repo keeps its visibility).")
    ] = False,
    revision: Annotated[
        Optional[str], typer.Option(help="Branch to upload to (created if missing).  [default: main]")
    ] = None,
    commit_message: Annotated[
        Optional[str], typer.Option(help="Commit message.  [default: Upload NAME with gmt-mlx]")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the files and the model card that would be uploaded; send nothing.")
    ] = False,
) -> None:
    """Publish a model folder to the Hub (token: HF_TOKEN or `hf auth login`)."""
    from gmt_mlx.publish.push import push as run

    run(folder, repo, private=private, revision=revision, commit_message=commit_message, dry_run=dry_run, log=echo)
