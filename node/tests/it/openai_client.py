"""Drives a bitnode daemon's HTTP API with the official `openai` client (the test of compatibility that
Ollama, llama-server and vLLM are held to) and prints what it got as one JSON object; the Rust test
(serve.rs) asserts on it. Usage: openai_client.py BASE_URL API_KEY MODEL PROMPT MAX_TOKENS
"""
import json
import sys
import threading

import openai

base_url, api_key, model, prompt, max_tokens = sys.argv[1:6]
max_tokens = int(max_tokens)
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)
out = {}

out["models"] = [m.id for m in client.models.list().data]

# A greedy completion, with the raw response for the device header.
raw = client.completions.with_raw_response.create(
    model=model, prompt=prompt, max_tokens=max_tokens, temperature=0
)
c = raw.parse()
out["completion"] = {
    "text": c.choices[0].text,
    "finish_reason": c.choices[0].finish_reason,
    "usage": c.usage.model_dump(),
    "device_header": raw.headers.get("x-bitnode-device"),
    "bitnode": (c.model_extra or {}).get("bitnode"),
}

# The same completion streamed: the pieces add up to the same text.
pieces = []
finish = None
for ch in client.completions.create(
    model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True
):
    if ch.choices:
        pieces.append(ch.choices[0].text)
        finish = ch.choices[0].finish_reason or finish
out["completion_stream"] = {"text": "".join(pieces), "finish_reason": finish}

# A chat, whole and streamed with usage.
messages = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": prompt},
]
chat = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
out["chat"] = {
    "text": chat.choices[0].message.content,
    "role": chat.choices[0].message.role,
    "finish_reason": chat.choices[0].finish_reason,
    "usage": chat.usage.model_dump(),
}
deltas, usage, roles = [], None, []
for ch in client.chat.completions.create(
    model=model,
    messages=messages,
    max_tokens=max_tokens,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
):
    if ch.usage is not None:
        usage = ch.usage.model_dump()
    for choice in ch.choices:
        if choice.delta.role:
            roles.append(choice.delta.role)
        if choice.delta.content:
            deltas.append(choice.delta.content)
out["chat_stream"] = {"text": "".join(deltas), "usage": usage, "roles": roles}

# Eight at once, each with its own prompt; greedy, so each must equal its own answer alone.
prompts = [f"{prompt} {i}" for i in range(8)]
results = [None] * 8
errors = []


def one(i):
    try:
        r = client.completions.create(model=model, prompt=prompts[i], max_tokens=max_tokens, temperature=0)
        results[i] = r.choices[0].text
    except Exception as e:  # reported to the Rust side, which fails the test with it
        errors.append(f"{i}: {e!r}")


threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
out["concurrent"] = {"prompts": prompts, "texts": results, "errors": errors}
out["sequential"] = [
    client.completions.create(model=model, prompt=p, max_tokens=max_tokens, temperature=0).choices[0].text
    for p in prompts[:2]
]

# The client's errors for an unknown model and a bad value.
try:
    client.completions.create(model="no-such-model", prompt=prompt, max_tokens=4)
    out["unknown_model"] = None
except openai.NotFoundError as e:
    out["unknown_model"] = {"status": e.status_code, "code": e.code}
try:
    client.completions.create(model=model, prompt=prompt, max_tokens=-3)
    out["bad_value"] = None
except openai.BadRequestError as e:
    out["bad_value"] = {"status": e.status_code, "param": e.param}

print(json.dumps(out))
