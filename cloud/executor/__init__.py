"""The cloud's execution provider: Celery over Redis (DESIGN.md invariant 11).

The broker is a wake-up, the database decides. A message carries a run id and nothing
else; the worker's engine claims the run by revision compare-and-set and advances it, so
a lost, duplicated or redelivered message changes nothing. Long waits live in the
database: the sweep (``sweep.py``) submits what came due and what a lost message left
behind, and starts scheduled workflows.

- ``celery_app.make_app(settings)``: the Celery app, every setting with its reason;
- ``executor.CeleryExecutor``: the engine's ``Executor`` port;
- ``tasks``: the one task, ``advance_run``, and the engine each worker process keeps;
- ``sweep.Sweep``: the periodic pass every ``tillflow cloud worker`` runs.
"""
