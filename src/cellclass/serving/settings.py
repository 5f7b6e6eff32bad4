"""Settings of the prediction service, read from the environment and the command line.

Every field has an environment variable ``CELLCLASS_<FIELD>`` (``CELLCLASS_STATE_DIR``,
``CELLCLASS_DATABASE``, ``CELLCLASS_OPEN_PREDICT``, ...); command-line options win over the
environment, which wins over the defaults.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cellclass.errors import ServiceError

ENV_PREFIX = "CELLCLASS_"


def default_state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The service's state folder: ``$CELLCLASS_STATE_DIR``, else a per-user data folder.

    The per-user folder is ``$XDG_DATA_HOME/cellclass`` (``~/.local/share/cellclass``) on
    Linux, ``~/Library/Application Support/cellclass`` on macOS and
    ``%LOCALAPPDATA%\\cellclass`` on Windows.
    """
    env = os.environ if environ is None else environ
    if env.get("CELLCLASS_STATE_DIR"):
        return Path(env["CELLCLASS_STATE_DIR"]).expanduser()
    home = Path.home()
    if sys.platform == "win32":
        base = Path(env.get("LOCALAPPDATA") or home / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = home / "Library" / "Application Support"
    else:
        base = Path(env.get("XDG_DATA_HOME") or home / ".local" / "share")
    return base / "cellclass"


class ServeSettings(BaseModel):
    """What ``cellclass serve`` runs and how.

    Attributes:
        run: Run folder (or ``.ckpt`` file) whose best checkpoint is served.
        state_dir: Folder of the contribution database and files, and of API keys.
        database: Database URL (``sqlite:///PATH`` or ``postgresql://...``); default
            ``sqlite:///STATE_DIR/cellclass.db``.
        files: Where contributed files go: a folder or ``s3://bucket/prefix``; default
            ``STATE_DIR/files``.
        onnx: Exported ONNX model to run with ONNX Runtime; with ``backend="auto"``,
            ``RUN/model.onnx`` is used when present and made from the served checkpoint.
        backend: ``auto``, ``torch`` or ``onnx``.
        open_predict: Allow ``/v1/predict`` and ``/v1/saliency`` without a key.
        tta: D4 test-time augmentation; None takes the run's setting.
        threads: Intra-op threads of torch and ONNX Runtime; None uses every available core.
        max_batch: Most images the micro-batcher runs at once.
        max_wait_ms: Longest wait for more requests before a batch runs.
        max_upload_bytes: Largest accepted image file (the default fits one image of
            ``max_pixels`` 16-bit values); a request's body may hold 1 MiB more.
        max_pixels: Largest accepted image, in values (height x width x channels).
        max_images: Most images in one request.
        max_field_objects: Most objects a field sent to ``/v1/fields`` may hold.
        max_metadata_bytes: Largest ``metadata`` JSON of a contribution.
        queue: A ranking CSV (``cellclass rank``) to serve as the labelling queue.
        pool: Folder the ranking's relative image paths are under; default the CSV's folder.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    run: Path
    state_dir: Path = Field(default_factory=default_state_dir)
    database: str | None = None
    files: str | None = None
    onnx: Path | None = None
    backend: Literal["auto", "torch", "onnx"] = "auto"
    open_predict: bool = False
    tta: bool | None = None
    threads: int | None = Field(default=None, ge=1)
    max_batch: int = Field(default=32, ge=1)
    max_wait_ms: float = Field(default=2.0, ge=0)
    max_upload_bytes: int = Field(default=32 * 1024 * 1024, ge=1)
    max_pixels: int = Field(default=4096 * 4096, ge=1)
    max_images: int = Field(default=64, ge=1)
    max_field_objects: int = Field(default=1000, ge=1)
    max_metadata_bytes: int = Field(default=16 * 1024, ge=2)
    queue: Path | None = None
    pool: Path | None = None

    @field_validator("state_dir", "run", "onnx", "queue", "pool", mode="after")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser()

    @model_validator(mode="after")
    def _pool_needs_a_queue(self) -> ServeSettings:
        if self.pool is not None and self.queue is None:
            raise ValueError(f"a pool folder ({self.pool}) is given without a queue; valid: --pool together "
                             f"with --queue RANK.csv")
        return self

    @property
    def database_url(self) -> str:
        """The database URL in effect."""
        return self.database or f"sqlite:///{(self.state_dir / 'cellclass.db').as_posix()}"

    @property
    def queue_pool(self) -> Path | None:
        """The folder of the queue's images in effect (None without a queue)."""
        if self.queue is None:
            return None
        return self.pool if self.pool is not None else self.queue.parent

    @property
    def files_url(self) -> str:
        """The file store in effect (a folder or an ``s3://`` URL)."""
        return self.files or str(self.state_dir / "files")

    @property
    def max_request_bytes(self) -> int:
        """Largest upload request body: one image at ``max_upload_bytes`` plus 1 MiB for the form fields.

        Several images in one request share it: what one image can need bounds what a
        request may make the server receive, however many images it carries.
        """
        return self.max_upload_bytes + 1024 * 1024

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ServeSettings:
        """Defaults, then ``CELLCLASS_*`` variables, then ``overrides`` that are not None.

        Raises:
            ServiceError: When a value is invalid; the message names the field and the
                environment variable.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            key = ENV_PREFIX + name.upper()
            if env.get(key, "") != "":
                values[name] = env[key]
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "state_dir" not in values:
            values["state_dir"] = default_state_dir(env)
        try:
            return cls(**values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))} (env {ENV_PREFIX}{str(e['loc'][0]).upper()}): "
                f"{e['msg']}, got {e.get('input')!r}" if e["loc"]
                else e["msg"].removeprefix("Value error, ")  # a check of several fields together
                for e in exc.errors()
            )
            raise ServiceError(f"invalid service settings: {problems}") from None
