"""Response bodies of the REST API (pydantic v2)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class LayerOut(BaseModel):
    name: str
    op_type: str | None
    node_name: str | None
    scope: str | None = None  # the node's module path (sensitivity.layers.Layer.scope); absent for older uploads
    shape: list[int]
    num_params: int


class ModelSummary(BaseModel):
    """A model in a list: everything but its layers (a page of 500 models of 16,384 layers each would
    be a gigabyte of JSON); GET /v1/models/{id} has them."""

    model_config = ConfigDict(from_attributes=True)
    id: str
    name: str
    format: str
    sha256: str
    size_bytes: int
    opset: int | None
    details: dict[str, Any]
    layer_count: int
    created_at: datetime


class ModelOut(ModelSummary):
    layers: list[LayerOut]


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    name: str
    sha256: str
    size_bytes: int
    num_samples: int | None = Field(
        description="the first dim every array of rank >= 1 shares (the sample count "
        "when samples lie on axis 0); null when they differ: a job counts "
        "the samples on each model input's sample axis when it is submitted"
    )
    has_labels: bool
    arrays: dict[str, Any]
    created_at: datetime


class ModelPage(BaseModel):
    items: list[ModelSummary]
    total: int


class DatasetPage(BaseModel):
    items: list[DatasetOut]
    total: int


class Health(BaseModel):
    status: str
    checks: dict[str, str] = {}
