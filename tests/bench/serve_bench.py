"""Measures a running bitnode daemon's OpenAI-compatible API with the standard library alone (the GPU
machine has no internet, so no `openai` package there): the first request for a model (the engine host's
cold load), then warm requests one at a time (time to first token of a streamed request, decode rate), then
N concurrent requests (aggregate tokens/s). Prints one JSON object.

Usage: serve_bench.py BASE_URL MODEL PROMPT_TOKENS GEN_TOKENS CONCURRENCY[,CONCURRENCY...]
"""
import http.client
import json
import sys
import threading
import time
from urllib.parse import urlparse

base, model, prompt_tokens, gen, levels = sys.argv[1:6]
gen = int(gen)
levels = [int(x) for x in levels.split(",")]
u = urlparse(base)
# About one token per word for the synthetic tokenizer's byte-level merges; the server reports the count.
prompt = " ".join(["mesh"] * int(prompt_tokens))


def post(body, stream=False):
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    c.request("POST", u.path + "/completions", json.dumps(body), {"Content-Type": "application/json"})
    return c, c.getresponse()


def complete(max_tokens):
    t0 = time.time()
    c, r = post({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    v = json.loads(r.read())
    c.close()
    return time.time() - t0, v


def streamed(max_tokens):
    """(time to first token, total time, completion tokens)."""
    t0 = time.time()
    c, r = post(
        {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    first, usage = None, None
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        v = json.loads(line[6:])
        if v.get("choices") and v["choices"][0].get("text") and first is None:
            first = time.time() - t0
        if v.get("usage"):
            usage = v["usage"]
    c.close()
    return first, time.time() - t0, usage


out = {}
dt, v = complete(gen)
out["first_request_s"] = dt
out["device"] = v.get("bitnode")
out["prompt_tokens"] = v["usage"]["prompt_tokens"]
warm = [complete(gen) for _ in range(3)]
out["warm_request_s"] = [w[0] for w in warm]
out["warm_decode_tok_s"] = [w[1]["usage"]["completion_tokens"] / w[0] for w in warm]
ttft = [streamed(1)[0] for _ in range(5)]
out["ttft_s"] = sorted(ttft)
out["ttft_median_s"] = sorted(ttft)[len(ttft) // 2]
for n in levels:
    res = [None] * n

    def one(i):
        res[i] = complete(gen)

    t0 = time.time()
    ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.time() - t0
    toks = sum(r[1]["usage"]["completion_tokens"] for r in res)
    out[f"concurrency_{n}"] = {"wall_s": wall, "tokens": toks, "aggregate_tok_s": toks / wall}
print(json.dumps(out))
