"""The report job's script door: ``python tune/report.py SWEEP_FOLDER`` is ``timerefine report``. The job
itself is pipelines/report.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines import jobs, report

if __name__ == "__main__":
    sys.exit(jobs.main(report))
