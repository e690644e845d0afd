"""After the whole end-to-end suite, on its healthy stack: no ERROR line and no traceback in the logs of
Label Studio, the backend and the workers. (The file's name makes pytest run it after the others; a test
that breaks something on purpose does so on a stack of its own.)"""

from __future__ import annotations

import re
from pathlib import Path

from devstack.label_studio import LabelStudio
from devstack.stack import Stack

# A JSON line of a worker at level error or critical, a text log line at ERROR or CRITICAL, a traceback.
PROBLEM = re.compile(r'"level": "(error|critical)"|\b(ERROR|CRITICAL)\b|Traceback \(most recent call last\)')


def problems(text: str) -> list[str]:
    return [line[:400] for line in text.splitlines() if PROBLEM.search(line)]


def test_a_healthy_run_leaves_no_error_or_traceback_in_any_log(
    stack: Stack, stack_log: Path, label_studio: LabelStudio
) -> None:
    stack.check_running()
    assert label_studio.log_path is not None
    found = {
        "backend and workers": problems(stack_log.read_text(errors="replace")),
        "Label Studio": problems(label_studio.log_path.read_text(errors="replace")),
    }
    assert found == {"backend and workers": [], "Label Studio": []}
