"""One JSON line for a finished (or NaN-stopped) run: its final and best sparse-path top-1.

python results/dcil_robustness/record.py WORKDIR SECONDS key=value ...
"""

import json
import pathlib
import sys

workdir, seconds = pathlib.Path(sys.argv[1]), int(sys.argv[2])
record = dict(arg.split("=", 1) for arg in sys.argv[3:]) | {"seconds": seconds}
record = {k: json.loads(v) if k in ("seed", "lr", "sparsity") else v for k, v in record.items()}
summary = workdir / "summary.json"
if summary.exists():
  s = json.loads(summary.read_text())
  record |= {"top1": s["final"]["top1"], "best": s["best"]["top1"], "steps": s["steps"]}
else:
  record |= {"top1": None, "log_tail": workdir.with_suffix(".log").read_text()[-300:]}
print(json.dumps(record))
