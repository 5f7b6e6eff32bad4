"""Fixtures of the tracking tests: an initialised MLflow store to copy, store readers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, migrated MLflow SQLite store (migrating a new one takes several seconds)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_store(mlflow_template: Path):
    """Copy the template store to ``folder/mlflow.db``; return its URI."""

    def place(folder: Path) -> str:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(mlflow_template, folder / "mlflow.db")
        return f"sqlite:///{folder.resolve() / 'mlflow.db'}"

    return place
