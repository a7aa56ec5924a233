"""Build the extraction/summary prompt set over long documents: the docstrings
of Python standard-library modules on this machine, each with a task that
quotes, extracts or summarises. Deterministic (sorted candidates, fixed seed),
so the same Python version gives the same set. Built before any measurement
on it; the n-gram matcher's constants were fixed before it existed.

    python scripts/make_extraction_prompts.py benchmarks/prompts/extraction.jsonl
"""

import importlib
import json
import random
import sys
from pathlib import Path

# Every top-level standard-library module with a long enough docstring (sorted:
# deterministic per Python version); these would print or open windows on import.
SKIP = {"this", "antigravity", "idlelib", "tkinter", "turtle", "turtledemo", "pydoc_data", "lib2to3"}
TASKS = [
    ("extract", "From the document above, list every function, class, method or option name it "
                "mentions, one per line, exactly as written in the document."),
    ("quote", "Quote, word for word, the two sentences of the document above that best explain what "
              "the module is for. Then quote its first example, if it has one, exactly as written."),
    ("summary", "Summarise the document above in five bullet points, reusing its own wording and "
                "names wherever possible."),
    ("rewrite", "Rewrite the document above as Markdown: keep every sentence as it is, but turn "
                "names into `code` and lists into bullet lists."),
]
MIN_CHARS, MAX_CHARS = 1200, 5000


def documents():
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in SKIP:
            continue
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - platform-specific modules
            continue
        doc = (mod.__doc__ or "").strip()
        if len(doc) >= MIN_CHARS:
            # cut at a paragraph boundary so the model sees whole sentences
            if len(doc) > MAX_CHARS:
                cut = doc.rfind("\n\n", 0, MAX_CHARS)
                doc = doc[:cut if cut > MIN_CHARS else MAX_CHARS]
            yield name, doc


def main(out):
    rng = random.Random(0)
    rows = []
    for i, (name, doc) in enumerate(documents()):
        kind, task = TASKS[i % len(TASKS)]
        rows.append({"id": f"{name}:{kind}", "category": kind,
                     "turns": [f"Document: the docstring of Python's `{name}` module.\n\n"
                               f"\"\"\"\n{doc}\n\"\"\"\n\n{task}"]})
    rng.shuffle(rows)
    rows = rows[:40]
    Path(out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} prompts to {out} (Python {sys.version.split()[0]})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/prompts/extraction.jsonl")
