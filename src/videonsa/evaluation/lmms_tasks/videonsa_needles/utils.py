"""Document functions of the `videonsa_needles` lmms-eval task; videos resolve against NEEDLE_SET_DIR.

`lmms_run.install_needle_task` writes this file with NEEDLE_SET_DIR set to the needle set's folder.
"""

from pathlib import Path

from videonsa.evaluation.lmms_tasks import needle_task

NEEDLE_SET_DIR = Path(__file__).parent


def needle_doc_to_visual(doc):
    return needle_task.doc_to_visual(doc, NEEDLE_SET_DIR)


needle_doc_to_text = needle_task.doc_to_text
needle_process_results = needle_task.process_results
needle_accuracy = needle_task.accuracy
