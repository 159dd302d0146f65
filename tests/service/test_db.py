"""Migrations match the ORM, and an out-of-date schema is refused with a useful message."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from service.store.db import SchemaOutOfDate, check_schema, current_revision, head_revision, make_engine, upgrade
from service.store.tables import Base


def test_migrations_match_the_orm(backend_settings):
    engine = make_engine(backend_settings.resolved_database_url)
    assert current_revision(engine) == head_revision()
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, Base.metadata)
    engine.dispose()
    assert differences == []


def test_empty_database_is_refused_then_upgraded(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'fresh.db'}")
    with pytest.raises(SchemaOutOfDate, match="mpq db upgrade"):
        check_schema(engine)
    upgrade(engine)
    check_schema(engine)
    engine.dispose()


def test_downgrade_then_upgrade_round_trips(tmp_path):
    from alembic import command

    from service.store.db import alembic_config

    url = f"sqlite:///{tmp_path / 'round.db'}"
    engine = make_engine(url)
    upgrade(engine)
    command.downgrade(alembic_config(url), "base")
    assert current_revision(engine) is None
    upgrade(engine)
    assert current_revision(engine) == head_revision()
    engine.dispose()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_layer_counts_are_filled_in_for_models_stored_before_the_column(backend, tmp_path, request):
    from sqlalchemy import text

    url = f"sqlite:///{tmp_path / 'old.db'}" if backend == "sqlite" else request.getfixturevalue("own_postgres_url")
    engine = make_engine(url)
    upgrade(engine, "0005")
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO models (id, name, format, sha256, size_bytes, details, layers, created_at)"
                " VALUES ('m', 'm', 'onnx', :sha, 1, '{}', :layers, CURRENT_TIMESTAMP)"
            ),
            {"sha": "0" * 64, "layers": '[{"name": "a"}, {"name": "b"}, {"name": "c"}]'},
        )
    upgrade(engine)
    with engine.connect() as connection:
        assert connection.scalar(text("SELECT layer_count FROM models WHERE id = 'm'")) == 3
    engine.dispose()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_datasets_keep_their_counts_and_take_none_after_0007(backend, tmp_path, request):
    """0007 makes datasets.num_samples nullable (arrays whose first dims differ: per-input sample
    axes); rows stored before keep their count. Downgrading below it names uncounted rows instead
    of inventing a count for them."""
    from alembic import command
    from sqlalchemy import text

    from service.store.db import alembic_config

    url = f"sqlite:///{tmp_path / 'old.db'}" if backend == "sqlite" else request.getfixturevalue("own_postgres_url")
    engine = make_engine(url)
    upgrade(engine, "0006")
    insert = text(
        "INSERT INTO datasets (id, name, sha256, size_bytes, num_samples, has_labels, arrays, created_at)"
        " VALUES (:id, 'd', :sha, 1, :count, false, '{}', CURRENT_TIMESTAMP)"
    )
    with engine.begin() as connection:
        connection.execute(insert, {"id": "old", "sha": "0" * 64, "count": 16})
    upgrade(engine)
    with engine.begin() as connection:
        connection.execute(insert, {"id": "axes", "sha": "1" * 64, "count": None})
        rows = dict(connection.execute(text("SELECT id, num_samples FROM datasets")).all())
    assert rows == {"old": 16, "axes": None}
    with pytest.raises(RuntimeError, match="1 datasets have no common first dim"):
        command.downgrade(alembic_config(url), "0006")
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM datasets WHERE id = 'axes'"))
    command.downgrade(alembic_config(url), "0006")
    assert current_revision(engine) == "0006"
    engine.dispose()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_plans_keep_only_measurements_in_measured_after_0008(backend, tmp_path, request):
    """0008 moves a stored plan's run metadata and plan-level data out of ``measured`` into ``result``
    (the run's under ``run``, as PlanResult.to_dict() has it); the downgrade moves them back."""
    import json

    from alembic import command
    from sqlalchemy import text

    from service.store.db import alembic_config

    url = f"sqlite:///{tmp_path / 'old.db'}" if backend == "sqlite" else request.getfixturevalue("own_postgres_url")
    engine = make_engine(url)
    upgrade(engine, "0007")
    measurements = {"metric": 97.5, "baseline": 98.0, "drop": 0.5}
    extras = {"uniform": {"w8a8": {"layers": {"a": "w8a8"}}}, "excluded": [], "layer_nodes": {"a": {"scope": ""}}}
    run = {"evaluations": 3, "search": {"kind": "pareto"}, "timings": {"total": 1.5}}
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO models (id, name, format, sha256, size_bytes, details, layers, created_at)"
                " VALUES ('m', 'm', 'onnx', :sha, 1, '{}', '[]', CURRENT_TIMESTAMP)"
            ),
            {"sha": "0" * 64},
        )
        connection.execute(
            text(
                "INSERT INTO datasets (id, name, sha256, size_bytes, num_samples, has_labels, arrays, created_at)"
                " VALUES ('d', 'd', :sha, 1, 4, false, '{}', CURRENT_TIMESTAMP)"
            ),
            {"sha": "1" * 64},
        )
        connection.execute(
            text(
                "INSERT INTO plans (id, model_id, calibration_dataset_id, search, request, assignment, predicted,"
                " measured, versions, created_at) VALUES ('p', 'm', 'd', 'pareto', '{}', '{}', '{}', :measured,"
                " '{}', CURRENT_TIMESTAMP)"
            ),
            {"measured": json.dumps({**measurements, **extras, **run})},
        )
    upgrade(engine)

    def stored(column: str) -> dict:
        with engine.connect() as connection:
            value = connection.scalar(text(f"SELECT {column} FROM plans WHERE id = 'p'"))
        return value if isinstance(value, dict) else json.loads(value)

    assert stored("measured") == measurements
    assert stored("result") == {**extras, "run": run}
    command.downgrade(alembic_config(url), "0007")
    assert stored("measured") == {**measurements, **extras, **run}
    engine.dispose()


def _dropped_connection() -> Exception:
    from sqlalchemy.exc import OperationalError

    return OperationalError("SELECT 1", {}, Exception("terminating connection due to administrator command"))


@pytest.mark.slow
def test_retrying_outlasts_a_dropped_connection_until_its_deadline():
    import time

    from service.store.db import retrying

    failures = iter([_dropped_connection()] * 4)

    def flaky() -> str:
        error = next(failures, None)
        if error is not None:
            raise error
        return "done"

    assert retrying(flaky, first_delay_s=0.01) == "done"

    calls = []

    def down() -> None:
        calls.append(time.monotonic())
        raise _dropped_connection()

    start = time.monotonic()
    with pytest.raises(Exception, match="administrator command"):
        retrying(down, deadline_s=0.5, first_delay_s=0.01, max_delay_s=0.1)
    assert 0.3 < time.monotonic() - start < 2.0 and len(calls) >= 6  # kept trying, capped delays

    def broken() -> None:
        calls.append("broken")
        raise ValueError("not a connection problem")

    with pytest.raises(ValueError):
        retrying(broken, first_delay_s=0.01)
    assert calls.count("broken") == 1


def test_json_columns_refuse_nan_and_infinity(backend_settings):
    """A result holding NaN is an error when stored, never a value clients cannot parse."""
    from service.store.db import session_factory
    from service.store.tables import Job

    engine = make_engine(backend_settings.resolved_database_url)
    with session_factory(engine)() as session:
        session.add(Job(type="sensitivity", params={"loss": float("nan")}))
        with pytest.raises(Exception, match="Out of range float values are not JSON compliant"):
            session.commit()
    engine.dispose()
