#!/usr/bin/env python3
"""Structured output, log-probabilities and function calls on the real default model, through the
official `openai` Python package, unmodified. Usage: test_real_model.py PATH/TO/moss MODEL.gguf
(prints "N passed, M failed")."""
import http.cookiejar
import json
import os
import subprocess
import sys
import tempfile
import traceback
import urllib.request
from enum import Enum
from typing import List

import openai
from pydantic import BaseModel, Field

MOSS = os.path.abspath(sys.argv[1])
MODEL = os.path.abspath(sys.argv[2])
tmp = tempfile.mkdtemp(prefix="moss-real-")
env = dict(os.environ,
           MOSS_DATABASE__DATA_DIR=os.path.join(tmp, "data"),
           MOSS_ENGINE__DEVICE="cpu",
           MOSS_ENGINE__SYSTEM_PROMPT="You are a helpful assistant.",
           MOSS_LIMITS__DAILY_USER_TOKENS="1000000",
           MOSS_LIMITS__GENERATE__PER_MINUTE="6000",
           MOSS_LIMITS__GENERATE__BURST="1000",
           RUST_LOG="warn")
server = subprocess.Popen([MOSS, "serve", "--addr", "127.0.0.1:0", "--model", MODEL], env=env,
                          stdout=subprocess.PIPE, text=True)
base = server.stdout.readline().split()[-1]
invite = server.stdout.readline().split()[-1]


def call(opener, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method, headers={"content-type": "application/json"})
    with opener.open(req) as r:
        text = r.read().decode()
        return json.loads(text) if text else None


b = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
call(b, "POST", "/api/register", {"invite_code": invite.split("code=")[1], "email": "real@example.com", "password": "a long password"})
client = openai.OpenAI(base_url=base + "/v1", api_key=call(b, "POST", "/api/keys", {"name": "t"})["key"], max_retries=0,
                       timeout=600)
results = []


def check(name):
    def run(fn):
        if os.environ.get("MOSS_TEST_ONLY", "") not in name:  # run one check by a word of its name
            return
        try:
            fn()
            results.append((name, None))
            print(f"ok - {name}")
        except Exception:  # noqa: BLE001 - every failure is reported, then counted
            results.append((name, traceback.format_exc()))
            print(f"not ok - {name}\n{traceback.format_exc()}")
    return run


class Unit(str, Enum):
    piece = "piece"
    kilogram = "kilogram"
    litre = "litre"


class Item(BaseModel):
    name: str = Field(max_length=40)
    quantity: int = Field(ge=0, le=1000)
    unit: Unit


class Customer(BaseModel):
    name: str = Field(max_length=40)
    city: str = Field(max_length=40)


class Order(BaseModel):
    customer: Customer
    items: List[Item] = Field(min_length=1, max_length=5)
    urgent: bool


ORDERS = [
    "Alice in Boston wants 3 pieces of bread and 2 litres of milk, as soon as possible.",
    "Bob from Denver orders 5 kilograms of rice. No hurry.",
    "Carol (Austin) needs 12 pieces of apple and 1 litre of juice by tonight, urgently.",
    "Dan in Seattle: 2 kilograms of coffee beans, whenever convenient.",
    "Eve, living in Miami, asks for 4 pieces of mango and 3 pieces of lime. It is urgent.",
    "Frank from Chicago would like 10 litres of water delivered next week.",
    "Grace in Portland orders 1 kilogram of cheese and 6 pieces of bagel, urgent please.",
    "Heidi (Phoenix) wants 7 pieces of croissant; no rush.",
    "Ivan in Dallas needs 2 litres of olive oil and 1 kilogram of salt right away.",
    "Judy from Atlanta: 20 pieces of egg, not urgent.",
    "北京的王芳要 3 公斤大米和 2 升牛奶，很急。",
    "上海的李雷订 5 个馒头，不着急。",
    "广州的陈静需要 1 升酱油和 4 个鸡蛋，今天就要。",
    "深圳的张伟想买 2 公斤苹果，下周送到就行。",
    "杭州的刘洋要 6 个包子和 1 升豆浆，加急。",
    "成都的赵敏订 10 公斤土豆，不急。",
    "南京的孙丽需要 3 升矿泉水，马上要。",
    "武汉的周杰要 8 个橙子和 2 公斤面粉，不赶时间。",
    "西安的吴敏订 1 公斤牛肉，尽快送。",
    "重庆的郑浩想要 12 个饺子，明天送就行。",
]


@check("a JSON schema with nested objects, enums and arrays holds on 20 of 20 prompts (parse)")
def _():
    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    bad = []
    for text in ORDERS:
        r = parse(model="m", max_tokens=300, temperature=0, response_format=Order,
                  messages=[{"role": "user", "content": f"Extract the order as JSON: {text}"}])
        choice = r.choices[0]
        if choice.finish_reason != "stop" or not isinstance(choice.message.parsed, Order):
            bad.append((text, choice.finish_reason, choice.message.content))
    assert not bad, bad


@check("log-probabilities of a Chinese answer join to its text, plain and streamed")
def _():
    ask = dict(model="m", max_tokens=24, temperature=0, logprobs=True, top_logprobs=5,
               messages=[{"role": "user", "content": "用一句话介绍长城。"}])
    r = client.chat.completions.create(**ask)
    content = r.choices[0].message.content
    entries = r.choices[0].logprobs.content
    assert b"".join(bytes(e.bytes) for e in entries) == content.encode(), (entries, content)
    assert all(e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in entries)
    pieces, streamed = [], []
    for chunk in client.chat.completions.create(stream=True, **ask):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
            streamed.extend(chunk.choices[0].logprobs.content)
    assert "".join(pieces) == content
    assert [e.bytes for e in streamed] == [e.bytes for e in entries]


@check("a forced function call, its result given back, and the answer after it")
def _():
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city",
        "parameters": {"type": "object",
                       "properties": {"city": {"type": "string", "description": "The city"},
                                      "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                       "required": ["city", "unit"]}}}]
    question = [{"role": "user", "content": "What's the weather like in Paris today, in celsius?"}]
    r = client.chat.completions.create(model="m", messages=question, tools=tools, max_tokens=80, temperature=0,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", r
    call_ = choice.message.tool_calls[0]
    args = json.loads(call_.function.arguments)
    assert call_.function.name == "get_weather" and "paris" in args["city"].lower() and args["unit"] == "celsius", call_
    follow = question + [choice.message.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": call_.id, "content": json.dumps({"temperature": 18, "sky": "sunny"})}]
    r = client.chat.completions.create(model="m", messages=follow, tools=tools, max_tokens=60, temperature=0)
    answer = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop" and answer and not r.choices[0].message.tool_calls, r
    # The call and its result went back in (what the 0.5B model makes of them is its own affair: with
    # the same messages llama.cpp's server has it repeat the call's JSON too).
    first = client.chat.completions.create(model="m", messages=question, tools=tools, max_tokens=1)
    assert r.usage.prompt_tokens > first.usage.prompt_tokens + 30, (r.usage, first.usage)


server.terminate()
server.wait(timeout=20)
failed = sum(1 for _, e in results if e)
print(f"{len(results) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)
