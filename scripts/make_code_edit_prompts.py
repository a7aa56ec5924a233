"""Build the code-editing prompt set from Python standard-library source on this
machine: one function per prompt, each with an edit instruction (rename, type
hints, docstrings, comprehension, described bug fix). Deterministic (fixed
seed, sorted modules), so the same Python version gives the same set.

    python scripts/make_code_edit_prompts.py benchmarks/prompts/code-edit.jsonl
"""

import ast
import inspect
import json
import random
import sys
from pathlib import Path

MODULES = ["textwrap", "shlex", "fnmatch", "colorsys", "calendar", "difflib", "string", "csv",
           "glob", "heapq", "bisect", "ipaddress", "statistics", "html", "base64", "quopri",
           "netrc", "pprint", "locale", "gettext", "mimetypes", "tokenize", "urllib.parse"]
EDITS = [
    ("rename", "Rename the variable `{var}` to `{new}` everywhere in this function. Reply with the full edited function only."),
    ("hints", "Add type hints to every parameter and the return value of this function. Reply with the full edited function only."),
    ("docstring", "Add a Google-style docstring to this function describing its arguments and return value. Reply with the full edited function only."),
    ("comprehension", "Rewrite this function so that any loop that builds a list uses a list comprehension instead, keeping behaviour identical. Reply with the full edited function only."),
    ("bug", "This function has an off-by-one bug in how it handles its last element. Fix it and reply with the full corrected function only."),
]


def functions(mod):
    src = inspect.getsource(mod)
    tree = ast.parse(src)
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            text = ast.get_source_segment(src, node)
            if text and 8 <= text.count("\n") <= 45:
                names = sorted({n.id for n in ast.walk(node) if isinstance(n, ast.Name)
                                and isinstance(n.ctx, ast.Store) and len(n.id) > 1})
                yield node.name, text, names


def main(out):
    import importlib

    rng = random.Random(0)
    rows = []
    for name in MODULES:
        mod = importlib.import_module(name)
        for fname, text, names in functions(mod):
            kind, instr = EDITS[len(rows) % len(EDITS)]
            if kind == "rename":
                if not names:
                    continue
                var = rng.choice(names)
                instr = instr.format(var=var, new=var + "_value")
            rows.append({"id": f"{name}.{fname}:{kind}", "category": kind,
                         "turns": [f"{instr}\n\n```python\n{text}\n```"]})
    rng.shuffle(rows)
    rows = rows[:60]
    Path(out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} prompts to {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/prompts/code-edit.jsonl")
