"""The official `openai` SDK, unmodified, against the session server: response_format, stream_options,
SGLang's extras through extra_body, continue_final_message, and a streamed echo."""

import json
import re

import jsonschema
import openai
import pytest

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "population": {"type": "integer"}},
    "required": ["city", "population"],
    "additionalProperties": False,
}
USER = [{"role": "user", "content": "Give the capital of Bulgaria and its population as JSON."}]


@pytest.fixture(scope="module")
def sdk(kiln_server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=kiln_server + "/v1", api_key="unused")


def test_response_format_json_schema_gives_valid_json(sdk):
    fmt = {"type": "json_schema", "json_schema": {"name": "capital", "schema": SCHEMA, "strict": True}}
    out = sdk.chat.completions.create(model="m", messages=USER, response_format=fmt, max_tokens=60, temperature=0)
    assert out.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMA)


def json_object_or_its_prefix(text: str, finish_reason: str) -> None:
    """A finished answer is a JSON object; one cut by max_tokens is at least the start of one."""
    if finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert text.lstrip().startswith("{")


def test_response_format_json_object_on_both_routes(sdk):
    chat = sdk.chat.completions.create(model="m", messages=USER, response_format={"type": "json_object"}, max_tokens=24, temperature=0)
    json_object_or_its_prefix(chat.choices[0].message.content, chat.choices[0].finish_reason)
    comp = sdk.completions.create(model="m", prompt="JSON:", max_tokens=24, temperature=0, extra_body={"response_format": {"type": "json_object"}})
    json_object_or_its_prefix(comp.choices[0].text, comp.choices[0].finish_reason)
    free = sdk.chat.completions.create(model="m", messages=USER, max_tokens=8, temperature=0)
    assert not free.choices[0].message.content.lstrip().startswith("{")  # so the format, not the prompt, made it JSON


def test_sglang_extras_through_extra_body(sdk):
    out = sdk.completions.create(model="m", prompt="My phone number is", max_tokens=20, temperature=0, extra_body={"regex": r"\d{3}-\d{4}"})
    assert re.fullmatch(r"\d{3}-\d{4}", out.choices[0].text)
    out = sdk.completions.create(
        model="m", prompt="Count: one, two,", max_tokens=4, temperature=0,
        extra_body={"top_k": 1, "min_tokens": 4, "ignore_eos": True, "repetition_penalty": 1.0},
    )  # fmt: skip
    assert out.usage.completion_tokens == 4


def test_stream_options_include_usage_ends_with_the_usage(sdk):
    chunks = list(sdk.completions.create(model="m", prompt="Hello", max_tokens=5, temperature=0, stream=True, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 5 and last.usage.total_tokens == last.usage.prompt_tokens + 5
    assert all(c.usage is None for c in chunks[:-1])
    continuous = list(
        sdk.chat.completions.create(
            model="m", messages=USER, max_tokens=4, temperature=0, stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}
        )
    )
    counts = [c.usage.completion_tokens for c in continuous if c.choices and c.usage is not None]
    assert counts == sorted(counts) and counts[-1] == 4


def test_streamed_echo_starts_with_the_prompt(sdk):
    full = sdk.completions.create(model="m", prompt="The sky is", max_tokens=5, temperature=0, echo=True)
    streamed = "".join(c.choices[0].text for c in sdk.completions.create(model="m", prompt="The sky is", max_tokens=5, temperature=0, echo=True, stream=True) if c.choices)
    assert streamed == full.choices[0].text and streamed.startswith("The sky is")


def test_continue_final_message_continues_the_assistant_turn(sdk, client):
    messages = [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "A fruit I like is the"}]
    out = sdk.chat.completions.create(model="m", messages=messages, max_tokens=6, temperature=0, extra_body={"continue_final_message": True})
    prompt = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\nA fruit I like is the"
    native = client.post("/generate", json={"text": prompt, "sampling_params": {"max_new_tokens": 6, "temperature": 0}}).json()
    assert out.choices[0].message.content == native["text"]


def test_responses_answer_as_the_same_chat_does(sdk, client):
    r = sdk.responses.create(model="m", input="Name a colour.", instructions="Be brief.", max_output_tokens=8, temperature=0)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    chat = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8, "temperature": 0}).json()
    assert r.output_text == chat["choices"][0]["message"]["content"]
    assert (r.usage.input_tokens, r.usage.output_tokens) == (chat["usage"]["prompt_tokens"], chat["usage"]["completion_tokens"])
    assert r.object == "response" and r.output[0].role == "assistant"
    assert r.status == ("completed" if chat["choices"][0]["finish_reason"] == "stop" else "incomplete")


def test_responses_stream_the_documented_events(sdk):
    events = list(sdk.responses.create(model="m", input=[{"role": "user", "content": "Count to three."}], max_output_tokens=6, temperature=0, stream=True))
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    assert types[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert types[-1] in ("response.completed", "response.incomplete")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-1].response.output_text and deltas
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_responses_json_schema_and_what_is_refused(sdk, client):
    fmt = {"format": {"type": "json_schema", "name": "capital", "schema": SCHEMA, "strict": True}}
    r = sdk.responses.create(model="m", input=USER[0]["content"], text=fmt, max_output_tokens=60, temperature=0)
    if r.status == "completed":
        jsonschema.validate(json.loads(r.output_text), SCHEMA)
    else:
        assert r.output_text.startswith("{")
    bad = client.post("/v1/responses", json={"input": "hi", "previous_response_id": "resp_1"})
    assert bad.status_code == 400 and "previous_response_id" in bad.json()["message"]
