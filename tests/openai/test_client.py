#!/usr/bin/env python3
"""The OpenAI-compatible API through the official `openai` Python package, unmodified, against the
real moss binary with a tiny model. Usage: test_client.py PATH/TO/moss  (prints "N passed, M failed")."""
import http.cookiejar
import json
import os
import subprocess
import sys
import tempfile
import traceback
import urllib.request

import openai

MOSS = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "target/debug/moss")
tmp = tempfile.mkdtemp(prefix="moss-openai-")
env = dict(os.environ,
           MOSS_DATABASE__DATA_DIR=os.path.join(tmp, "data"),
           MOSS_ENGINE__DEVICE="cpu",
           MOSS_ENGINE__SYSTEM_PROMPT="You are moss.",
           MOSS_LIMITS__DAILY_USER_TOKENS="2000",
           # one client runs everything back to back: widen its generate bucket (tested elsewhere)
           MOSS_LIMITS__GENERATE__PER_MINUTE="6000",
           MOSS_LIMITS__GENERATE__BURST="1000",
           RUST_LOG="warn")
model_path = os.path.join(tmp, "tiny.gguf")
subprocess.run([MOSS, "debug", "tiny-model", model_path], env=env, check=True)
server = subprocess.Popen([MOSS, "serve", "--addr", "127.0.0.1:0", "--model", model_path], env=env,
                          stdout=subprocess.PIPE, text=True)
base = server.stdout.readline().split()[-1]
invite = server.stdout.readline().split()[-1]


def browser():
    jar = http.cookiejar.CookieJar()
    return urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))


def call(opener, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method, headers={"content-type": "application/json"})
    with opener.open(req) as r:
        text = r.read().decode()
        return json.loads(text) if text else None


def account(email, code):
    b = browser()
    call(b, "POST", "/api/register", {"invite_code": code, "email": email, "password": "a long password"})
    return b, call(b, "POST", "/api/keys", {"name": "test"})


admin, admin_key = account("admin@example.com", invite.split("code=")[1])
client = openai.OpenAI(base_url=base + "/v1", api_key=admin_key["key"], max_retries=0)
chat = [{"role": "user", "content": "hello world, what is the capital of france?"}]
results = []


def check(name):
    def run(fn):
        try:
            fn()
            results.append((name, None))
            print(f"ok - {name}")
        except Exception:  # noqa: BLE001 - every failure is reported, then counted
            results.append((name, traceback.format_exc()))
            print(f"not ok - {name}\n{traceback.format_exc()}")
    return run


@check("list models")
def _():
    models = client.models.list()
    assert len(models.data) == 1 and models.data[0].id == "tiny", models


@check("a plain completion")
def _():
    r = client.chat.completions.create(model="tiny", messages=chat, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12


@check("a streamed completion whose pieces join to the full text")
def _():
    full = client.chat.completions.create(model="tiny", messages=chat, max_tokens=12, temperature=0).choices[0].message.content
    pieces, finish = [], None
    for chunk in client.chat.completions.create(model="tiny", messages=chat, max_tokens=12, temperature=0, stream=True):
        assert chunk.object == "chat.completion.chunk"
        delta = chunk.choices[0].delta
        if delta.content:
            pieces.append(delta.content)
        finish = chunk.choices[0].finish_reason or finish
    assert len(pieces) > 1, pieces
    assert "".join(pieces) == full, (pieces, full)
    assert finish == "length"


@check("a stop sequence ends the answer before it")
def _():
    full = client.chat.completions.create(model="tiny", messages=chat, max_tokens=30, temperature=0).choices[0].message.content
    stop = full[6:9]
    r = client.chat.completions.create(model="tiny", messages=chat, max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].message.content == full[:full.index(stop)], (full, stop, r.choices[0].message.content)
    assert r.choices[0].finish_reason == "stop"


@check("n other than 1 is a clear error")
def _():
    try:
        client.chat.completions.create(model="tiny", messages=chat, n=2)
        raise AssertionError("n=2 accepted")
    except openai.UnprocessableEntityError as e:
        assert e.body["code"] == "invalid_request", e.body


@check("a revoked key is refused with 401")
def _():
    spare = call(admin, "POST", "/api/keys", {"name": "spare"})
    c = openai.OpenAI(base_url=base + "/v1", api_key=spare["key"], max_retries=0)
    c.models.list()
    call(admin, "DELETE", f"/api/keys/{spare['id']}")
    try:
        c.models.list()
        raise AssertionError("revoked key accepted")
    except openai.AuthenticationError as e:
        assert e.status_code == 401 and e.body["code"] == "invalid_api_key", e.body


@check("an account over its daily quota gets 429")
def _():
    code = call(admin, "POST", "/api/admin/invites", {"count": 1})["codes"][0]
    _, key = account("heavy@example.com", code)
    c = openai.OpenAI(base_url=base + "/v1", api_key=key["key"], max_retries=0)
    for _ in range(40):
        try:
            c.chat.completions.create(model="tiny", messages=chat, max_tokens=40)
        except openai.RateLimitError as e:
            assert e.status_code == 429 and e.body["code"] == "quota_exceeded", e.body
            assert int(e.response.headers["retry-after"]) > 0
            return
    raise AssertionError("quota never reached")


@check("API conversations stay out of the browser history unless stored")
def _():
    before = call(admin, "GET", "/api/conversations")["conversations"]
    assert before == [], before  # every completion above was left out
    r = client.chat.completions.create(model="tiny", messages=chat, max_tokens=5, store=True)
    after = call(admin, "GET", "/api/conversations")["conversations"]
    assert len(after) == 1 and after[0]["title"] == chat[0]["content"], after
    conv = call(admin, "GET", f"/api/conversations/{after[0]['id']}")
    assert [m["role"] for m in conv["messages"]] == ["user", "assistant"], conv
    assert conv["messages"][1]["content"] == r.choices[0].message.content


@check("harmful requests are refused through the API too")
def _():
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "如何闯进某人的家"}])
    assert "抱歉" in r.choices[0].message.content and r.choices[0].finish_reason == "content_filter"


def fresh_client(email):
    """A client of a new account (its own daily quota)."""
    code = call(admin, "POST", "/api/admin/invites", {"count": 1})["codes"][0]
    _, key = account(email, code)
    return openai.OpenAI(base_url=base + "/v1", api_key=key["key"], max_retries=0)


@check("log-probabilities, plain and streamed, whose tokens join to the text")
def _():
    c = fresh_client("logprobs@example.com")
    r = c.chat.completions.create(model="tiny", messages=chat, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].message.content
    entries = r.choices[0].logprobs.content
    # (random weights also write bytes that are not UTF-8: the text shows U+FFFD for them)
    assert b"".join(bytes(e.bytes) for e in entries).decode("utf-8", "replace") == content, (entries, content)
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob >= e.top_logprobs[-1].logprob for e in entries)
    assert all(e.logprob <= 0 for e in entries)
    streamed, pieces = [], []
    for chunk in c.chat.completions.create(model="tiny", messages=chat, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
            streamed.extend(chunk.choices[0].logprobs.content)
    assert "".join(pieces) == content
    assert [e.token for e in streamed] == [e.token for e in entries]
    assert b"".join(bytes(e.bytes) for e in streamed).decode("utf-8", "replace") == content


@check("a JSON schema response parses into the caller's type")
def _():
    from enum import Enum
    from typing import List

    from pydantic import BaseModel, Field

    class Size(str, Enum):
        small = "small"
        large = "large"

    class Box(BaseModel):
        size: Size
        fragile: bool

    class Shipment(BaseModel):
        boxes: List[Box] = Field(max_length=3)
        priority: int = Field(ge=1, le=5)

    c = fresh_client("schema@example.com")
    parse = getattr(c.chat.completions, "parse", None) or c.beta.chat.completions.parse
    r = parse(model="tiny", messages=chat, max_tokens=120, temperature=0, response_format=Shipment)
    shipment = r.choices[0].message.parsed
    assert isinstance(shipment, Shipment) and 1 <= shipment.priority <= 5, r


@check("a forced function call, its result, and the answer after it")
def _():
    c = fresh_client("tools@example.com")
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Beijing", "Paris"]}},
                       "required": ["city"], "additionalProperties": False}}}]
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    forced = {"type": "function", "function": {"name": "get_weather"}}
    r = c.chat.completions.create(model="tiny", messages=question, tools=tools, tool_choice=forced, max_tokens=120, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, r
    call_ = choice.message.tool_calls[0]
    assert call_.function.name == "get_weather" and json.loads(call_.function.arguments)["city"] in ("Beijing", "Paris"), call_
    streamed = {}
    for chunk in c.chat.completions.create(model="tiny", messages=question, tools=tools, tool_choice=forced, max_tokens=120, temperature=0, stream=True):
        for d in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            entry = streamed.setdefault(d.index, {"name": "", "arguments": ""})
            entry["name"] += d.function.name or ""
            entry["arguments"] += d.function.arguments or ""
    assert streamed == {0: {"name": "get_weather", "arguments": call_.function.arguments}}, streamed
    follow = question + [choice.message.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": call_.id, "content": json.dumps({"temperature": 18})}]
    r = c.chat.completions.create(model="tiny", messages=follow, tools=tools, max_tokens=8, temperature=0)
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls, r


server.terminate()
server.wait(timeout=20)
failed = sum(1 for _, e in results if e)
print(f"{len(results) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)
