"""docs/asyncapi.yaml: current, AsyncAPI 3 shaped, every $ref resolving, and complete
against the code it describes (event models, gateway protocol, close codes)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

import streaming.events
import streaming.gateway.server
from streaming.asyncapi import build_document, main, render
from streaming.events import DeadLetter, InputEvent, OutputEvent, load_output, parse_input
from streaming.gateway.errors import AuthReason, ErrorCode, ProtocolError
from streaming.gateway.protocol import (  # _OPS: the protocol's own list of ops
    _OPS,
    Op,
    acknowledgement,
    error_message,
    parse_op,
    read_event,
    snapshot_message,
)
from streaming.gateway.server import WS_PATH
from streaming.schemas import render_schemas
from streaming.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCUMENT = ROOT / "docs" / "asyncapi.yaml"


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return yaml.safe_load(DOCUMENT.read_text(encoding="utf-8"))


def resolve(doc: dict[str, Any], ref: str) -> Any:
    """A local JSON pointer (``#/a/b``) in ``doc``; KeyError if it leads nowhere."""
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in refs(value)]
    if isinstance(node, list):
        return [r for item in node for r in refs(item)]
    return []


def valid(doc: dict[str, Any], schema: dict[str, Any], value: Any) -> bool:
    """A small JSON Schema check: the keywords the document uses, format not checked."""
    if "$ref" in schema:
        return valid(doc, resolve(doc, schema["$ref"]), value)
    kinds = {
        "object": dict,
        "array": list,
        "string": str,
        "boolean": bool,
        "null": type(None),
        "integer": int,
        "number": (int, float),
    }
    if "type" in schema:
        numeric = not isinstance(value, bool) or schema["type"] == "boolean"
        if not (numeric and isinstance(value, kinds[schema["type"]])):
            return False

    def same(a: Any, b: Any) -> bool:  # JSON equality: true is not 1
        return isinstance(a, bool) == isinstance(b, bool) and a == b

    checks = [
        "const" not in schema or same(value, schema["const"]),
        "enum" not in schema or any(same(value, e) for e in schema["enum"]),
        all(valid(doc, s, value) for s in schema.get("allOf", [])),
        "anyOf" not in schema or any(valid(doc, s, value) for s in schema["anyOf"]),
        "oneOf" not in schema or sum(valid(doc, s, value) for s in schema["oneOf"]) == 1,
        "not" not in schema or not valid(doc, schema["not"], value),
    ]
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        checks += [
            all(k in value for k in schema.get("required", [])),
            all(valid(doc, props[k], v) for k, v in value.items() if k in props),
            all(
                extra is True or (extra is not False and valid(doc, extra, v))
                for k, v in value.items()
                if k not in props
            ),
        ]
    if isinstance(value, list):
        checks += [
            len(value) >= schema.get("minItems", 0),
            len(value) <= schema.get("maxItems", len(value)),
            all(valid(doc, schema.get("items", {}), v) for v in value),
        ]
    if isinstance(value, str):
        checks += [
            len(value) >= schema.get("minLength", 0),
            len(value) <= schema.get("maxLength", len(value)),
            "pattern" not in schema or re.search(schema["pattern"], value) is not None,
        ]
    if isinstance(value, int | float) and not isinstance(value, bool):
        checks += [
            value >= schema.get("minimum", value),
            value <= schema.get("maximum", value),
        ]
    return all(checks)


def payload(doc: dict[str, Any], message_id: str) -> dict[str, Any]:
    return resolve(doc, doc["components"]["messages"][message_id]["payload"]["$ref"])


def channel_types(doc: dict[str, Any], channel: str) -> set[str]:
    """The ``type`` (or ``op``) constants of a channel's messages."""
    found = set()
    for ref in doc["channels"][channel]["messages"].values():
        props = resolve(doc, resolve(doc, ref["$ref"])["payload"]["$ref"])["properties"]
        found.add((props.get("type") or props["op"])["const"])
    return found


def model_types(union: Any) -> set[str]:
    """The ``type`` literals of the models in a discriminated union of streaming.events."""
    models = typing.get_args(typing.get_args(union)[0])
    return {typing.get_args(m.model_fields["type"].annotation)[0] for m in models}


# ---------------------------------------------------------------- current


def test_committed_document_is_what_the_code_generates():
    assert DOCUMENT.read_text(encoding="utf-8") == render(), (
        "docs/asyncapi.yaml is stale: run python -m streaming.asyncapi"
    )
    assert render() == render()  # deterministic within a process


def test_command_writes_and_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = tmp_path / "asyncapi.yaml"
    assert main(["--check", str(path)]) == 1  # missing
    assert main([str(path)]) == 0 and main(["--check", str(path)]) == 0
    path.write_text(path.read_text().replace("3.0.0", "2.6.0", 1))
    assert main(["--check", str(path)]) == 1
    assert "stale" in capsys.readouterr().err


def test_generation_ignores_the_environment():
    """Another process, with settings in its environment, finds the committed file current."""
    env = {**os.environ, "CFNESA_INPUT_TOPIC": "elsewhere", "CFNESA_GATEWAY_PORT": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "streaming.asyncapi", "--check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------- AsyncAPI 3 shape


def test_document_is_asyncapi_3_shaped(doc: dict[str, Any]):
    assert doc["asyncapi"] == "3.0.0"
    assert doc["info"]["title"] and re.fullmatch(r"\d+\.\d+\.\d+", doc["info"]["version"])
    assert {name: s["protocol"] for name, s in doc["servers"].items()} == {
        "kafka": "kafka",
        "gateway": "ws",
    }
    for name, channel in doc["channels"].items():
        assert channel["address"] and channel["messages"], name
        for server in channel["servers"]:
            assert server["$ref"].startswith("#/servers/"), name
    assert doc["operations"]
    for name, op in doc["operations"].items():
        assert op["action"] in ("send", "receive"), name
        channel = op["channel"]["$ref"]
        assert channel.startswith("#/channels/") and resolve(doc, channel), name
        # AsyncAPI 3: an operation's messages are messages of its channel
        for message in op["messages"]:
            assert message["$ref"].startswith(channel + "/messages/"), (name, message)
        for message in op.get("reply", {}).get("messages", []):
            assert message["$ref"].startswith(op["reply"]["channel"]["$ref"] + "/messages/")
    for message in doc["components"]["messages"].values():
        assert message["payload"]["$ref"].startswith("#/components/schemas/")
        assert message["contentType"] == "application/json"


def test_every_ref_resolves(doc: dict[str, Any]):
    found = refs(doc)
    assert len(found) > 50
    unresolved = []
    for ref in found:
        try:
            resolve(doc, ref)
        except (KeyError, TypeError):
            unresolved.append(ref)
    assert unresolved == []
    assert not [r for r in found if "$defs" in r]  # pydantic's refs were all rewritten


def test_every_operation_and_channel_is_used(doc: dict[str, Any]):
    used = {op["channel"]["$ref"] for op in doc["operations"].values()}
    assert used == {f"#/channels/{name}" for name in doc["channels"]}
    used_messages = {
        r.rsplit("/", 1)[1] for r in refs(doc["channels"]) if r.startswith("#/components/messages/")
    }
    assert used_messages == set(doc["components"]["messages"])


def test_security_and_servers(doc: dict[str, Any]):
    schemes = [resolve(doc, s["$ref"]) for s in doc["servers"]["gateway"]["security"]]
    assert {"type": "http", "scheme": "bearer"}.items() <= schemes[0].items()
    assert {"type": "httpApiKey", "name": "token", "in": "query"}.items() <= schemes[1].items()
    defaults = Settings.model_construct()
    assert doc["servers"]["kafka"]["host"] == defaults.kafka_bootstrap
    assert doc["servers"]["gateway"]["host"] == f"{defaults.gateway_host}:{defaults.gateway_port}"


# ---------------------------------------------------------------- complete


def test_every_event_type_is_a_message_on_its_topic(doc: dict[str, Any]):
    defined = set()
    for value in vars(streaming.events).values():
        if (
            isinstance(value, type)
            and issubclass(value, BaseModel)
            and "type" in value.model_fields
        ):
            literal = typing.get_args(value.model_fields["type"].annotation)
            defined.update(literal)
    assert defined == {"utterance", "end", "emotion", "alert", "summary", "dead_letter"}
    documented = {
        props["type"]["const"]
        for m in doc["components"]["messages"]
        for props in [payload(doc, m)["properties"]]
        if "type" in props
    }
    assert defined <= documented

    defaults = Settings.model_construct()
    by_address = {c["address"]: name for name, c in doc["channels"].items()}
    assert channel_types(doc, by_address[defaults.input_topic]) == model_types(InputEvent)
    assert channel_types(doc, by_address[defaults.output_topic]) == model_types(OutputEvent)
    assert channel_types(doc, by_address[defaults.dlq_topic]) == {"dead_letter"}
    # the gateway forwards every output event
    assert model_types(OutputEvent) <= channel_types(doc, by_address[WS_PATH])
    # every Kafka message documents its key
    for name, channel in doc["channels"].items():
        if channel["address"] == WS_PATH:
            continue
        assert channel["bindings"]["kafka"]["topic"] == channel["address"]
        for ref in channel["messages"].values():
            key = resolve(doc, ref["$ref"])["bindings"]["kafka"]["key"]
            assert "conversation_id" in key["description"], name


def test_event_schemas_are_those_of_docs_schemas(doc: dict[str, Any]):
    schemas = doc["components"]["schemas"]
    for name, text in render_schemas().items():
        assert (ROOT / "docs" / "schemas" / name).read_text(encoding="utf-8") == text
        defs = json.loads(text.replace('"#/$defs/', '"#/components/schemas/'))["$defs"]
        for model, schema in defs.items():
            assert schemas[model] == schema, (name, model)
    dlq = json.loads(render_schemas()["utterance-features.dlq.schema.json"].replace("$defs/", ""))
    del dlq["$defs"], dlq["$schema"], dlq["title"]
    own = json.dumps({**schemas["DeadLetter"], "title": None}).replace("components/schemas/", "")
    assert json.loads(own) == {**dlq, "title": None}


def test_text_topic_matches_the_featurizer():
    """utterance-text's models live in workers/, which streaming/ may not import."""
    from streaming.events import TextEnd, TextUtterance, parse_text
    from workers.featurize import GROUP_ID, text_dlq_topic

    doc = build_document()
    schemas = doc["components"]["schemas"]
    assert schemas["TextUtterance"] == TextUtterance.model_json_schema()
    assert schemas["TextEnd"] == TextEnd.model_json_schema()
    text = doc["operations"]["receiveUtteranceText"]
    assert text["bindings"]["kafka"]["groupId"]["enum"] == [GROUP_ID]
    addresses = {c["address"] for c in doc["channels"].values()}
    assert text_dlq_topic(Settings.model_construct()) in addresses
    for message in ("textUtterance", "textEnd"):
        example = doc["components"]["messages"][message]["examples"][0]["payload"]
        parse_text(json.dumps(example).encode(), 10_000)  # raises if refused


def test_gateway_protocol_is_complete(doc: dict[str, Any]):
    ws = next(c for c in doc["channels"].values() if c["address"] == WS_PATH)
    messages = {m: resolve(doc, r["$ref"]) for m, r in ws["messages"].items()}
    consts = {
        (m["payload"]["$ref"], (s.get("type") or s["op"])["const"])
        for m in messages.values()
        for s in [resolve(doc, m["payload"]["$ref"])["properties"]]
    }
    documented = {c for _, c in consts}
    # client ops: the protocol's list, each accepted by parse_op in the documented form
    assert set(_OPS) <= documented
    for op in _OPS:
        example = doc["components"]["messages"][op]["examples"][0]["payload"]
        assert parse_op(json.dumps(example), 65536).op == op
    # server messages: whatever the protocol's builders produce is documented
    ids = Op("subscribe", ("call-1",), request_id=4)
    made = (
        [acknowledgement(Op(op, ("call-1",))) for op in _OPS]
        + [acknowledgement(Op(op, all_conversations=True)) for op in _OPS]
        + [
            acknowledgement(ids),
            snapshot_message("call-1", []),
            error_message(ProtocolError(ErrorCode.FORBIDDEN, "no", ("call-1",)), 4),
        ]
        + [error_message(ProtocolError(code, "detail")) for code in ErrorCode]
    )
    for text in made:
        message = json.loads(text)
        assert message["type"] in documented, message
        schema = next(resolve(doc, ref) for ref, const in consts if const == message["type"])
        assert valid(doc, schema, message), message
    error = payload(doc, "error")
    assert error["properties"]["code"]["enum"] == [c.value for c in ErrorCode]
    # close codes: the server's constants and the table in docs/gateway.md
    codes = {c["code"] for c in ws["x-close-codes"]}
    server = {v for k, v in vars(streaming.gateway.server).items() if k.startswith("CLOSE_")}
    assert server and server <= codes
    table = (ROOT / "docs" / "gateway.md").read_text(encoding="utf-8")
    assert codes == {int(c) for c in re.findall(r"^\| (\d{4}) \|", table, re.M)}
    for code in codes:
        assert f"| {code} |" in ws["description"]
    assert ws["x-unauthorized-reasons"] == [r.value for r in AuthReason]


@pytest.mark.parametrize(
    "frame",
    [
        {"op": "subscribe", "conversations": ["call-1", "call-2"], "id": 7},
        {"op": "subscribe", "all": True, "id": "a"},
        {"op": "unsubscribe", "conversations": ["call-1"], "all": False},
        {"op": "unsubscribe", "all": True, "extra": "ignored"},
        {"op": "subscribe", "all": True, "conversations": ["call-1"]},  # both
        {"op": "subscribe"},  # neither
        {"op": "subscribe", "all": False},
        {"op": "subscribe", "conversations": []},
        {"op": "subscribe", "conversations": "call-1"},
        {"op": "subscribe", "conversations": ["bad\x01id"]},
        {"op": "subscribe", "conversations": ["x" * 257]},
        {"op": "subscribe", "conversations": [f"c{i}" for i in range(1001)]},
        {"op": "subscribe", "all": "yes"},
        {"op": "subscribe", "all": True, "id": 1.5},
        {"op": "subscribe", "all": True, "id": "x" * 65},
        {"op": "subscribe", "all": True, "id": 2**53},
        {"op": "publish", "all": True},
        {"conversations": ["call-1"]},
    ],
)
def test_request_schemas_agree_with_parse_op(doc: dict[str, Any], frame: dict[str, Any]):
    """A request the schemas allow is one the gateway accepts, and the other way round."""
    try:
        parse_op(json.dumps(frame), 1_000_000)
        accepted = True
    except ProtocolError:
        accepted = False
    allowed = any(valid(doc, payload(doc, op), frame) for op in _OPS)
    assert allowed == accepted


def test_examples_are_valid_and_accepted_by_the_code(doc: dict[str, Any]):
    checked = 0
    for message_id, message in doc["components"]["messages"].items():
        schema = payload(doc, message_id)
        for example in message["examples"]:
            body = example["payload"]
            assert valid(doc, schema, body), message_id
            raw = json.dumps(body).encode()
            kind = body.get("type")
            if kind in ("emotion", "alert", "summary"):
                assert load_output(raw).model_dump(by_alias=True) == body
                read_event(raw)  # the gateway can route it
            elif message_id in ("utterance", "end"):
                parse_input(raw)
            elif kind == "dead_letter":
                DeadLetter.model_validate(body)
            checked += 1
    assert checked == len(doc["components"]["messages"])
    # and the schema check is not vacuous
    assert not valid(doc, payload(doc, "emotion"), {**payload_example(doc, "emotion"), "x": 1})
    assert not valid(doc, payload(doc, "utterance"), {"type": "utterance"})


def payload_example(doc: dict[str, Any], message_id: str) -> dict[str, Any]:
    return dict(doc["components"]["messages"][message_id]["examples"][0]["payload"])


def test_paths_named_in_the_document_exist(doc: dict[str, Any]):
    text = DOCUMENT.read_text(encoding="utf-8")
    paths = set(re.findall(r"\bdocs/[\w./-]*\w", text))
    assert "docs/clients.md" in paths
    assert [p for p in sorted(paths) if not (ROOT / p).exists()] == []
