"""Stream one chat answer from a running `eagle3-mlx serve` with the openai client.

    python scripts/serve_demo.py [--base-url http://127.0.0.1:8080/v1] [--api-key KEY]
                                 [--prompt "..."] [--max-tokens 256] [--temperature 0]

Starts nothing itself. Prints the answer as it streams, then the client-side
speed (tok/s from the first to the last token, and including the time to the
first token) and the server's speculation statistics from the ``eagle3``
extra field of the final chunk: tau (tokens per target step), steps, accepted
drafts per source, draft and verify ms.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    p.add_argument("--api-key", default="none", help="the server's --api-key, if it has one")
    p.add_argument("--prompt", default="Write a Python function that checks whether a string is a "
                                       "palindrome, with a short docstring.")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    args = p.parse_args(argv)

    from openai import OpenAI

    client = OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    print(f"model {model} at {args.base_url}", file=sys.stderr)
    t0 = time.perf_counter()
    first = last = None
    stats, usage, pieces = None, None, 0
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": args.prompt}],
        max_tokens=args.max_tokens, temperature=args.temperature, stream=True,
        stream_options={"include_usage": True})
    for chunk in stream:
        extra = chunk.model_extra or {}
        if extra.get("eagle3"):
            stats = extra["eagle3"]
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                now = time.perf_counter()
                first = first if first is not None else now
                last = now
                pieces += 1
                print(choice.delta.content, end="", flush=True)
    total = time.perf_counter() - t0
    print()
    if usage is None or stats is None or first is None:
        print("no answer, usage or eagle3 statistics came back", file=sys.stderr)
        return 1
    n = usage.completion_tokens
    gen_s = max(last - first, 1e-9)
    print(f"{n} tokens in {total:.2f} s: {n / total:.1f} tok/s end to end, "
          f"{(n - 1) / gen_s:.1f} tok/s after the first token (first token {1000 * (first - t0):.0f} ms)")
    print(f"tau {stats.get('tokens_per_step', 0):.2f} tokens/step | {stats.get('steps')} steps | "
          f"accepted drafts {stats.get('accepted_drafts')} {stats.get('source_tokens')} | "
          f"draft {stats.get('draft_ms', 0):.0f} ms, verify {stats.get('verify_ms', 0):.0f} ms | "
          f"server {stats.get('generation_tps', 0):.1f} tok/s | tree {stats.get('tree')} "
          f"({stats.get('draft_source')}) | prompt {usage.prompt_tokens} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
