"""The mutation score of `make mutation`: mutmut's results (mutants/**/*.meta) for the mutants named by glob.

    python -m tests.mutation_score 'backend.url_policy.*' 'worker.registry.xǁModelRegistryǁpromote__*' ...

Prints one line per module (killed / checked), every surviving mutant (`mutmut show NAME` prints its diff),
and the score over all of them. A mutant is caught when a test failed or ran past mutmut's time limit; one
that no selected test reaches counts as a survivor. Exits 1 when the score is under --minimum (percent).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

# mutmut's exit codes (mutmut/stats.py): a test failed (1, 3) or the run passed the time limit (the rest).
CAUGHT = {1, 3, 24, -24, 36, 152, 255}
UNCAUGHT = {0: "survived", 5: "no tests", 33: "no tests"}


def results(mutants: Path) -> dict[str, int | None]:
    """Every mutant's exit code (None: not run yet), by mutmut's name for it."""
    codes: dict[str, int | None] = {}
    for meta in sorted(mutants.rglob("*.py.meta")):
        codes.update(json.loads(meta.read_text())["exit_code_by_key"])
    return codes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("patterns", nargs="+", help="mutant name globs, as given to `mutmut run`")
    parser.add_argument("--mutants", type=Path, default=Path("mutants"))
    parser.add_argument("--minimum", type=float, default=0.0, help="fail under this score (percent)")
    args = parser.parse_args(argv)
    if not args.mutants.is_dir():
        parser.error(f"{args.mutants} does not exist: run `mutmut run` first")

    chosen = {
        name: code
        for name, code in results(args.mutants).items()
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in args.patterns)
    }
    if not chosen:
        parser.error(f"no mutant matches {args.patterns}")
    by_module: dict[str, Counter] = defaultdict(Counter)
    survivors, unchecked = [], 0
    for name, code in sorted(chosen.items()):
        module = name.split(".x", 1)[0]
        if code is None:
            unchecked += 1
        elif code in CAUGHT:
            by_module[module]["caught"] += 1
        else:
            by_module[module]["missed"] += 1
            survivors.append(f"{name} ({UNCAUGHT.get(code, f'exit code {code}')})")
    for module, counts in sorted(by_module.items()):
        checked = counts["caught"] + counts["missed"]
        print(f"{module}: {counts['caught']}/{checked} caught ({100 * counts['caught'] / checked:.1f} %)")
    for survivor in survivors:
        print(f"  survived: {survivor}")
    caught = sum(counts["caught"] for counts in by_module.values())
    checked = caught + len(survivors)
    score = 100 * caught / checked if checked else 0.0
    print(
        f"mutation score: {score:.1f} % ({caught} of {checked} mutants caught"
        + (f"; {unchecked} not run yet" if unchecked else "")
        + ")"
    )
    return 0 if score >= args.minimum else 1


if __name__ == "__main__":
    sys.exit(main())
