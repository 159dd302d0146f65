"""Migrations match the ORM, and an out-of-date schema is refused with a useful message."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from service.db import SchemaOutOfDate, check_schema, current_revision, head_revision, make_engine, upgrade
from service.tables import Base


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

    from service.db import alembic_config

    url = f"sqlite:///{tmp_path / 'round.db'}"
    engine = make_engine(url)
    upgrade(engine)
    command.downgrade(alembic_config(url), "base")
    assert current_revision(engine) is None
    upgrade(engine)
    assert current_revision(engine) == head_revision()
    engine.dispose()
