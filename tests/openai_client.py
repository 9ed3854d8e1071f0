"""Drives a flotilla node with the official OpenAI Python client; prints one JSON object of results.

Usage: python3 tests/openai_client.py http://127.0.0.1:PORT/v1
"""
import json
import sys

import openai

client = openai.OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0, timeout=120)
model = client.models.list().data[0].id
out = {"models": [m.id for m in client.models.list().data]}

messages = [{"role": "user", "content": "Name a colour."}]
chat = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
out["chat"] = chat.choices[0].message.content
out["chat_finish"] = chat.choices[0].finish_reason

pieces = []
for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0, stream=True):
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
out["chat_stream"] = "".join(pieces)

comp = client.completions.create(model=model, prompt="The capital of France is", max_tokens=12, temperature=0)
out["completion"] = comp.choices[0].text
out["usage_completion_tokens"] = comp.usage.completion_tokens

pieces = []
usage = None
for chunk in client.completions.create(
    model=model, prompt="The capital of France is", max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
):
    if chunk.choices:
        pieces.append(chunk.choices[0].text)
    if chunk.usage:
        usage = chunk.usage.completion_tokens
out["completion_stream"] = "".join(pieces)
out["completion_stream_usage"] = usage

print(json.dumps(out))
