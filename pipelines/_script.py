"""The script door: ``python pipelines/<job>.py ...`` (what ``ray job submit`` runs) starts the job as part of
its package, exactly as ``timerefine <job>`` does.

A job file imports this module first thing when it runs as a script (``if not __package__``). It puts the
checkout on ``sys.path`` in place of the ``pipelines/`` folder itself (whose modules would otherwise shadow
packages named like them), imports the job as ``pipelines.<job>`` and runs it through ``jobs.main``.
"""

import importlib
import sys
from pathlib import Path

_file = Path(sys.argv[0]).resolve()
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _file.parent]
sys.path.insert(0, str(_file.parents[1]))
_jobs = importlib.import_module(f"{_file.parent.name}.jobs")
sys.exit(_jobs.main(importlib.import_module(f"{_file.parent.name}.{_file.stem}")))
