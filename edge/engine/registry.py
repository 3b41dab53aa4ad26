"""Which definition a run uses: the latest registered for new runs, the pinned one after."""

from __future__ import annotations

from pathlib import Path

from edge.engine.clock import Clock
from edge.engine.loader import Workflow, load_file, load_snapshot
from edge.engine.navigation import Navigator
from edge.engine.ports import Store
from edge.engine.records import RunRecord
from edge.errors import WorkflowNotFound


class Registry:
    """Definitions by content hash and by type, backed by the store's snapshots, so a
    process that never saw the YAML can still resume a run on its pinned definition."""

    def __init__(self, store: Store, clock: Clock) -> None:
        self.store = store
        self.clock = clock
        self._by_hash: dict[str, Workflow] = {}
        self._by_type: dict[str, Workflow] = {}
        self._nav: dict[str, Navigator] = {}

    def register(self, workflow: Workflow | str | Path) -> Workflow:
        wf = workflow if isinstance(workflow, Workflow) else load_file(workflow)
        self.store.save_definition(
            wf.content_hash, wf.workflow_type, wf.version, wf.snapshot, self.clock.now()
        )
        self._by_hash[wf.content_hash] = wf
        self._by_type[wf.workflow_type] = wf
        return wf

    def latest(self, workflow_type: str) -> Workflow:
        wf = self._by_type.get(workflow_type)
        if wf is None:
            snapshot = self.store.latest_definition(workflow_type)
            if snapshot is None:
                raise WorkflowNotFound(
                    f"no workflow '{workflow_type}' is registered",
                    hint="register its YAML first (tillflow run PATH does)",
                )
            wf = self._remember(load_snapshot(snapshot, source=f"<stored {workflow_type}>"))
        return wf

    def pinned(self, run: RunRecord) -> Workflow:
        wf = self._by_hash.get(run.definition_hash)
        if wf is None:
            snapshot = self.store.load_definition(run.definition_hash)
            if snapshot is None:
                raise WorkflowNotFound(
                    f"definition {run.definition_hash[:12]} of run {run.run_id} is missing"
                )
            wf = self._remember(load_snapshot(snapshot, source=f"<pinned {run.workflow_type}>"))
        return wf

    def navigator(self, wf: Workflow) -> Navigator:
        nav = self._nav.get(wf.content_hash)
        if nav is None:
            nav = self._nav[wf.content_hash] = Navigator(wf)
        return nav

    def _remember(self, wf: Workflow) -> Workflow:
        self._by_hash.setdefault(wf.content_hash, wf)
        return self._by_hash[wf.content_hash]
