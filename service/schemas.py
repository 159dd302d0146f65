"""Response bodies of the REST API (pydantic v2)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict


class LayerOut(BaseModel):
    name: str
    op_type: str | None
    node_name: str | None
    shape: list[int]
    num_params: int


class ModelOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    name: str
    format: str
    sha256: str
    size_bytes: int
    opset: int | None
    details: dict[str, Any]
    layers: list[LayerOut]
    created_at: datetime


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    name: str
    sha256: str
    size_bytes: int
    num_samples: int
    has_labels: bool
    arrays: dict[str, Any]
    created_at: datetime


class ModelPage(BaseModel):
    items: list[ModelOut]
    total: int


class DatasetPage(BaseModel):
    items: list[DatasetOut]
    total: int


class Health(BaseModel):
    status: str
    checks: dict[str, str] = {}
