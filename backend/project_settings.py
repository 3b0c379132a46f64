"""Per-project agent settings: the "Extra params" of Label Studio's Connect form, once Label Studio
confirms them.

Label Studio sends a model's ``extra_params`` with every ``/setup``. A ``/setup`` body is not
trusted (anyone who can reach the port may post one): it is validated and queued, and a job reads
the project's ML backends back from Label Studio (``GET /api/ml?project=ID``); only the params
Label Studio holds are stored here (``projects.db`` in the data directory) and used.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Dict, Optional

from .config import AgentSettings
from .db import Database
from .errors import SettingsError

log = logging.getLogger("smartsam.backend")


class ProjectSettings:
    """Confirmed extra params per project.

    Args:
        data_dir: the backend's data directory.
    """

    def __init__(self, data_dir: Path) -> None:
        path = Path(data_dir) / "projects.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = Database(path)
        with self._db.write() as c:
            c.execute("CREATE TABLE IF NOT EXISTS project_settings (project TEXT PRIMARY KEY, extra TEXT NOT NULL, "
                      "updated_at REAL NOT NULL)")

    def get(self, project: Optional[str]) -> Dict:
        """The project's confirmed extra params ({} when none)."""
        if project is None:
            return {}
        # read each time (cheap): another worker process may have confirmed new params
        r = self._db.conn().execute("SELECT extra FROM project_settings WHERE project=?", (str(project),)).fetchone()
        return json.loads(r[0]) if r else {}

    def set(self, project: str, extra: Dict) -> bool:
        """Store the project's extra params; True when they changed."""
        project = str(project)
        if self.get(project) == extra:
            return False
        with self._db.write() as c:
            c.execute("INSERT OR REPLACE INTO project_settings VALUES (?, ?, ?)", (project, json.dumps(extra), time.time()))
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
