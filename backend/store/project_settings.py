"""Per-project agent settings: the "Extra params" of Label Studio's Connect form, once Label Studio
confirms them.

Label Studio sends a model's ``extra_params`` with every ``/setup``. A ``/setup`` body is not
trusted (anyone who can reach the port may post one): it is validated and queued, and a job reads
the project's ML backends back from Label Studio (``GET /api/ml?project=ID``); only the params
Label Studio holds are stored here (``projects.db`` in the data directory, or the shared database)
and used; read at each request, so every replica uses what any of them confirmed.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import sqlalchemy as sa

from backend.config import AgentSettings
from backend.errors import SettingsError
from backend.store.db import Database

log = logging.getLogger("smartsam.backend")


TABLES = sa.MetaData()
sa.Table("project_settings", TABLES, sa.Column("project", sa.Text, primary_key=True),
         sa.Column("extra", sa.Text, nullable=False), sa.Column("updated_at", sa.Double, nullable=False))


class ProjectSettings:
    """Confirmed extra params per project.

    Args:
        data_dir: the backend's data directory.
        database_url: the shared database (``SMARTSAM_DATABASE_URL``); None: ``projects.db``.
    """

    def __init__(self, data_dir: Path, database_url: Optional[str] = None) -> None:
        self.db = Database.open(database_url, Path(data_dir) / "projects.db", "project_settings")
        # the composition root points this at the reference store's generation (versions, caches)
        self.on_change: Callable[[str], None] = lambda project: None
        self.db.create(TABLES)

    def get(self, project: Optional[str]) -> Dict:
        """The project's confirmed extra params ({} when none)."""
        if project is None:
            return {}
        # read each time (cheap): another worker process may have confirmed new params
        r = self.db.query_one("SELECT extra FROM project_settings WHERE project=?", (str(project),))
        return json.loads(r[0]) if r else {}

    def set(self, project: str, extra: Dict) -> bool:
        """Store the project's extra params; True when they changed."""
        project = str(project)
        if self.get(project) == extra:
            # already stored: this may be the retry of a confirmation whose write committed and
            # whose bump failed (the bump is another transaction, on SQLite another file), so
            # bump again: without it, every process would keep the old settings cached
            self.on_change(project)
            return False
        with self.db.write() as c:
            c.execute("INSERT INTO project_settings (project, extra, updated_at) VALUES (?, ?, ?) ON CONFLICT (project) "
                      "DO UPDATE SET extra = excluded.extra, updated_at = excluded.updated_at",
                      (project, json.dumps(extra), time.time()))
        self.on_change(project)
        return True

    def agent(self, base: AgentSettings, project: Optional[str]) -> AgentSettings:
        """``base`` with the project's confirmed extra params applied (``base`` when they no longer
        validate, e.g. stored by an older release: a click never fails for it)."""
        extra = self.get(project)
        try:
            return base.with_extra_params(extra)
        except SettingsError as e:
            log.warning("project %s: extra params %s not used (%s)", project, extra, e)
            return base

