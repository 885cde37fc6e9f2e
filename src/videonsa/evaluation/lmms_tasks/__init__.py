"""lmms-eval task files shipped with videonsa (docs/lmms-eval.md).

`videonsa_needles/` is the offline needle benchmark as an lmms-eval task: `videonsa_needles.yaml` reads a
needle set's `questions.jsonl` and `utils.py` gives lmms-eval the document functions of `needle_task`.
`videonsa.evaluation.lmms_run.install_needle_task` writes both next to (or pointing at) a needle set, which
then serves as lmms-eval's `--include_path`. Nothing here imports lmms-eval.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).parent
NEEDLE_TASK_DIR = TASKS_DIR / "videonsa_needles"
NEEDLE_TASK_NAME = "videonsa_needles"
