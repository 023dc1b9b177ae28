"""The sweep job's script door: ``python tune/sweep.py --config tune/synthetic.yaml`` (what ``ray job
submit`` runs) is ``timerefine sweep``. The job itself is pipelines/sweep.py; this folder holds its search
spaces (the YAML files beside this one)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines import jobs, sweep

if __name__ == "__main__":
    sys.exit(jobs.main(sweep))
