"""Structured output over HTTP: json_schema, regex and ebnf outputs parse and match, free requests are untouched."""

import json
import re

import jsonschema
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

EOS = 2  # SmolLM2's <|im_end|>: a completed grammar allows only it
PROMPT = "<|im_start|>user\nReply with a JSON object describing a person.<|im_end|>\n<|im_start|>assistant\n"

FIELDS = {
    "integer": {"type": "integer", "minimum": 0, "maximum": 120},
    "boolean": {"type": "boolean"},
    "string": {"type": "string", "maxLength": 10},
    "enum": {"type": "string", "enum": ["red", "green", "blue"]},
    "array": {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
}


@st.composite
def object_schemas(draw: st.DrawFn) -> dict:
    names = draw(st.lists(st.sampled_from(["name", "age", "city", "ok", "score", "tags"]), min_size=1, max_size=3, unique=True))
    props = {n: FIELDS[draw(st.sampled_from(sorted(FIELDS)))] for n in names}
    required = draw(st.lists(st.sampled_from(names), unique=True))
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def stream(client, body: dict) -> list[dict]:
    with client.stream("POST", "/generate", json={**body, "stream": True}) as resp:
        assert resp.status_code == 200
        raw = resp.read().decode()
    frames = [f.removeprefix("data: ") for f in raw.split("\n\n") if f]
    assert frames[-1] == "[DONE]"
    return [json.loads(f) for f in frames[:-1]]


def check_json(result: dict, schema: dict, max_new_tokens: int) -> bool:
    """Validates a finished output; returns False when it stopped at max_new_tokens instead."""
    finish = result["meta_info"]["finish_reason"]
    if finish["type"] == "length":
        assert len(result["output_ids"]) == max_new_tokens
        return False
    assert finish == {"type": "stop", "matched": EOS}, finish
    jsonschema.validate(json.loads(result["text"]), schema)
    return True


# No shrinking: each example is a batch through the model, and a failure prints its schemas anyway.
@settings(max_examples=3, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate], suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schemas=st.lists(object_schemas(), min_size=4, max_size=4), temperature=st.sampled_from([0.0, 0.7]), seed=st.integers(0, 1000))
def test_drawn_json_schemas_give_valid_json(generate, schemas, temperature, seed):
    params = [{"temperature": temperature, "sampling_seed": seed, "max_new_tokens": 96, "json_schema": json.dumps(s)} for s in schemas]
    results = generate({"text": [PROMPT] * len(schemas), "sampling_params": params})
    finished = [check_json(r, s, 96) for r, s in zip(results, schemas)]
    assert any(finished), [r["text"] for r in results]


def test_fixed_schema_greedy_and_sampled_all_finish_valid(generate):
    schema = {"type": "object", "properties": {"name": FIELDS["string"], "age": FIELDS["integer"]}, "required": ["name", "age"]}
    body = {"text": PROMPT, "sampling_params": {"temperature": 0.8, "sampling_seed": 11, "n": 4, "max_new_tokens": 96, "json_schema": json.dumps(schema)}}
    sampled = generate(body)
    greedy = generate({"text": PROMPT, "sampling_params": {"temperature": 0, "max_new_tokens": 96, "json_schema": json.dumps(schema)}})
    assert all(check_json(r, schema, 96) for r in sampled + [greedy])
    assert len({r["text"] for r in sampled}) > 1
    assert [r["output_ids"] for r in generate(body)] == [r["output_ids"] for r in sampled]


def test_any_json(generate):
    prompt = '<|im_start|>user\nReply with the JSON object {"ok": true} and nothing else.<|im_end|>\n<|im_start|>assistant\n'
    result = generate({"text": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 64, "json_schema": "$$ANY$$"}})
    assert result["meta_info"]["finish_reason"] == {"type": "stop", "matched": EOS}, result["text"]
    json.loads(result["text"])


@pytest.mark.parametrize(
    "pattern",
    [r"[a-z]{3,8}@[a-z]{3,8}\.(com|org)", r"\d{4}-\d{2}-\d{2}", r"(yes|no), because [a-z ]{1,30}\.", r"#[0-9a-f]{6}"],
)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_regex_output_fullmatches(generate, pattern, temperature):
    params = {"temperature": temperature, "sampling_seed": 3, "max_new_tokens": 48, "regex": pattern}
    result = generate({"text": "Answer:", "sampling_params": params})
    assert result["meta_info"]["finish_reason"] == {"type": "stop", "matched": EOS}
    assert re.fullmatch(pattern, result["text"]), result["text"]


def test_ebnf_output_is_in_the_language(generate):
    grammar = 'root ::= num ("+" | "*") num "=" num\nnum ::= [1-9] [0-9]?'
    for temperature in (0.0, 1.0):
        params = {"temperature": temperature, "sampling_seed": 5, "max_new_tokens": 40, "ebnf": grammar}
        result = generate({"text": "Write a sum:", "sampling_params": params})
        assert result["meta_info"]["finish_reason"]["type"] == "stop"
        assert re.fullmatch(r"[1-9][0-9]?[+*][1-9][0-9]?=[1-9][0-9]?", result["text"]), result["text"]


def test_free_requests_in_a_constrained_batch_are_unchanged(generate, solo_greedy):
    free = ["The capital of France is", "Once upon a time"]
    schema = json.dumps({"type": "object", "properties": {"city": FIELDS["string"]}, "required": ["city"]})
    constrained = {"temperature": 0.5, "sampling_seed": 1, "max_new_tokens": 24, "json_schema": schema}
    plain = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
    letters = {"temperature": 0.5, "sampling_seed": 2, "max_new_tokens": 24, "ebnf": 'root ::= "a"+ "b"'}
    results = generate({"text": [PROMPT, free[0], PROMPT, free[1]], "sampling_params": [constrained, plain, letters, plain]})
    for prompt, got in zip(free, results[1::2]):
        assert got["output_ids"] == solo_greedy(prompt, 24)["output_ids"]
    check_json(results[0], json.loads(schema), 24)
    assert re.fullmatch("a+b" if results[2]["meta_info"]["finish_reason"]["type"] == "stop" else "a*", results[2]["text"])


def test_streamed_schema_output_equals_the_final_one(client, generate):
    schema = {"type": "object", "properties": {"name": FIELDS["string"], "ok": FIELDS["boolean"]}, "required": ["name", "ok"]}
    body = {"text": PROMPT, "sampling_params": {"temperature": 0, "max_new_tokens": 96, "json_schema": json.dumps(schema)}}
    events = stream(client, body)
    assert len(events) >= 2 and all(e["meta_info"]["finish_reason"] is None for e in events[:-1])
    for prev, cur in zip(events, events[1:]):
        assert cur["output_ids"][: len(prev["output_ids"])] == prev["output_ids"] and cur["text"].startswith(prev["text"])
    whole = generate(body)
    assert events[-1]["text"] == whole["text"] and events[-1]["output_ids"] == whole["output_ids"]
    assert check_json(events[-1], schema, 96)


@pytest.mark.parametrize(
    "params,needle",
    [
        ({"json_schema": "{not json"}, "Invalid json_schema: Failed to parse JSON"),
        ({"json_schema": '{"type": "objec"}'}, 'Invalid json_schema: Unsupported type "objec"'),
        ({"regex": "(ab"}, "Invalid regex: Regex parsing error at position 4"),
        ({"ebnf": "root ::= foo"}, 'Invalid ebnf: EBNF parser error at line 1, column 10: Rule "foo" is not defined'),
        ({"regex": "a+", "ebnf": 'root ::= "a"'}, "Only one of regex, json_schema, or ebnf can be set."),
        ({"regex": "a+", "json_schema": "{}", "ebnf": 'root ::= "a"'}, "Only one of regex, json_schema, or ebnf can be set."),
    ],
)
def test_bad_grammars_are_400_with_the_compiler_message(client, params, needle):
    resp = client.post("/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 4, **params}})
    assert resp.status_code == 400
    assert needle in resp.json()["error"]["message"], resp.json()
    assert "[" not in resp.json()["error"]["message"].split(":")[0]  # no C++ log prefix
