"""The Fleet API's route modules: each exposes ``router`` (an ``APIRouter``) and is
found by ``cloud.api.fleet.discover_routers``; a module named ``_*`` is skipped."""
