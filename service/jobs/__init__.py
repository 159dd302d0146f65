"""Running jobs: where they run (``executor``, ``celery_app``), the supervisor that runs one and alone writes
its rows (``supervisor``, ``job_types``), and the sandboxed process that computes it (``job_process``,
``handlers``)."""
