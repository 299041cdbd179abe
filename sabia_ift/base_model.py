"""Base stage: build the tiny default model, or pin and check a pretrained one.

Writes models/base/base.json, which tokenize, train and evaluate read through
modeling.resolve_base: a tiny or copied model lives in models/base itself; a
Hub model stays in the HF cache, named by its id and the commit it resolved to.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from .artifacts import BaseInfo
from .config import BaseConfig, is_commit_sha
from .errors import ConfigError
from .io import atomic_path
from .modeling import check_model_folder, snapshot
from .toy.tiny_model import build_tiny_model

log = logging.getLogger(__name__)


def prepare_base(cfg: BaseConfig, out_dir: str | Path) -> dict[str, Any]:
    """Run the base stage: build the tiny model or pin and check a pretrained one."""
    out_dir = Path(out_dir)
    if cfg.source == "tiny":
        return build_tiny_model(cfg.tiny, out_dir)

    local = Path(cfg.name_or_path).expanduser()
    # "models/mine" reads like a Hub id; if its first part is a local folder, it is a path.
    looks_local = local.is_absolute() or cfg.name_or_path.startswith((".", "~")) \
        or cfg.name_or_path.count("/") != 1 or Path(local.parts[0]).is_dir()
    if local.is_dir():
        check_model_folder(local, f"base.name_or_path {cfg.name_or_path}")
        info = BaseInfo(source="local", name_or_path=cfg.name_or_path)
        folder = local
    elif looks_local:
        raise ConfigError(
            f"base.name_or_path: {cfg.name_or_path!r} is neither an existing folder nor a Hub id (org/name)"
        )
    else:
        folder = snapshot(cfg.name_or_path, cfg.revision, local_only=False)
        check_model_folder(folder, f"base model {cfg.name_or_path}@{cfg.revision}")
        # The snapshot folder is named by the commit it holds: that is what is pinned.
        commit = folder.name
        if not is_commit_sha(cfg.revision):
            log.warning("base.revision %r is a branch; it resolved to commit %s. Pin that sha in "
                        "params.yaml so later runs load the same weights.", cfg.revision, commit)
        info = BaseInfo(source="hub", name_or_path=cfg.name_or_path, revision=commit,
                        requested_revision=cfg.revision)

    with atomic_path(out_dir, is_dir=True) as tmp:
        if cfg.copy_weights:
            # DVC then tracks the weights; pick a cache link type that avoids copies (README).
            for item in folder.iterdir():
                if item.is_file():
                    shutil.copyfile(item.resolve(), tmp / item.name)
            info = BaseInfo(source="local_copy", origin=info.to_dict())
        info.write(tmp)
    return info.to_dict()
