"""Tool calling in the chat formats, token for token against the references (llama-models for Llama 3.1's JSON tool
calls and ipython role, mistral-common for Mistral's [AVAILABLE_TOOLS]/[TOOL_CALLS]/[TOOL_RESULTS]); the output
parsers on texts; and the grammar that forces a call admitting exactly the calls of the chosen tools."""

import json

import pytest

from minillama.tokenizer import tools as tl
from minillama.tokenizer.tokenizer import load_tokenizer
from test_chat_format import LLAMA3_MODEL, MISTRAL_MODEL

MISTRAL_V3 = MISTRAL_MODEL.parent / "mistral_instruct_tokenizer_240323.model.v3"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 5}}, "required": ["zone"], "additionalProperties": False}}}
CALL = {"id": "abc123XYZ", "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "c"})}}
ROUND_TRIP = [
    {"role": "system", "content": "You are a weather bot."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "abc123XYZ", "name": "get_weather", "content": '{"temp": 21, "sky": "clear"}'},
    {"role": "assistant", "content": "It is 21°C and clear."},
    {"role": "user", "content": "And tomorrow?"},
]


@pytest.fixture(scope="module")
def llama3():
    return load_tokenizer(LLAMA3_MODEL)


@pytest.fixture(scope="module")
def mistral3():
    return load_tokenizer(MISTRAL_V3)


def test_llama31_tool_dialog_matches_llama_models(llama3, monkeypatch):
    from llama_models.datatypes import RawMessage, StopReason, ToolCall
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer
    monkeypatch.setattr(tl, "today", lambda: "21 September 2024")
    ref = ChatFormat(Tokenizer(LLAMA3_MODEL))
    tools_turn = tl.LLAMA3_TOOLS_INTRO + json.dumps(WEATHER, indent=4) + tl.LLAMA3_TOOLS_OUTRO
    system = ("Environment: ipython\n\nCutting Knowledge Date: December 2023\nToday Date: 21 September 2024\n\n"
              "You are a weather bot.\n")  # prompt_format.md's "JSON based tool calling" system prompt
    raw = [RawMessage(role="system", content=system),
           RawMessage(role="user", content=tools_turn),
           RawMessage(role="user", content="Weather in Paris?"),
           RawMessage(role="assistant", content="", stop_reason=StopReason.end_of_message,
                      tool_calls=[ToolCall(call_id="abc123XYZ", tool_name="get_weather",
                                           arguments={"city": "Paris", "unit": "c"})]),
           RawMessage(role="tool", content='{"temp": 21, "sky": "clear"}'),
           RawMessage(role="assistant", content="It is 21°C and clear.", stop_reason=StopReason.end_of_turn),
           RawMessage(role="user", content="And tomorrow?")]
    expected = ref.encode_dialog_prompt(raw).tokens
    assert llama3.encode_dialog(ROUND_TRIP, format="llama3", tools=[WEATHER]) == expected
    text = llama3.decode(expected)
    assert "<|start_header_id|>ipython<|end_header_id|>" in text and '"parameters": {"city": "Paris"' in text
    assert text.count("<|eom_id|>") == 1  # the call ends its message; the result comes back in the ipython role


def test_llama31_mask_learns_the_call_and_its_eom(llama3):
    ids, mask = llama3.encode_dialog_with_mask(ROUND_TRIP[:3], format="llama3")
    learned = llama3.decode([t for t, m in zip(ids, mask) if m])
    assert learned == tl.llama3_call_text(tl.parse_call(CALL, "x")) + "<|eom_id|>"


def test_mistral_v3_tool_dialog_matches_mistral_common(mistral3):
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, ToolMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    ref = MistralTokenizer.from_file(str(MISTRAL_V3))
    tools = [Tool(function=Function(name=t["function"]["name"], description=t["function"].get("description", ""),
                                    parameters=t["function"]["parameters"])) for t in (WEATHER, TIME)]
    msgs = [SystemMessage(content="You are a weather bot."), UserMessage(content="Weather in Paris?"),
            AssistantMessage(tool_calls=[ToolCall(id="abc123XYZ", function=FunctionCall(
                name="get_weather", arguments=CALL["function"]["arguments"]))]),
            ToolMessage(tool_call_id="abc123XYZ", name="get_weather", content='{"temp": 21, "sky": "clear"}'),
            AssistantMessage(content="It is 21°C and clear."), UserMessage(content="And tomorrow?")]
    expected = ref.encode_chat_completion(ChatCompletionRequest(messages=msgs, tools=tools)).tokens
    assert mistral3.encode_dialog(ROUND_TRIP, format="mistral", tools=[WEATHER, TIME]) == expected
    # the reply the model would give: [TOOL_CALLS] + JSON, parsed back into the same call
    reply = ref.instruct_tokenizer.encode_assistant_message(msgs[2], False)  # [TOOL_CALLS] JSON </s>
    assert reply[0] == mistral3.token_id("[TOOL_CALLS]")
    assert tl.parse_tool_calls("mistral", mistral3.decode(reply)) == [
        tl.ToolCall("get_weather", {"city": "Paris", "unit": "c"}, "abc123XYZ")]


def test_formats_without_tools_refuse_them(llama3):
    with pytest.raises(ValueError, match="chat format llama2 has no tool-calling form"):
        llama3.encode_dialog([{"role": "user", "content": "hi"}], format="llama2", tools=[WEATHER])
    with pytest.raises(ValueError, match="message 2: tool_calls\\[0\\].function.arguments is not valid JSON"):
        llama3.encode_dialog(ROUND_TRIP[:2] + [{"role": "assistant", "tool_calls": [
            {"id": "1", "function": {"name": "f", "arguments": "{oops"}}]}], format="llama3")


@pytest.mark.parametrize("fmt, text, calls", [
    ("llama3", '<|python_tag|>{"type": "function", "name": "get_weather", "parameters": {"city": "Oslo"}}',
     [("get_weather", {"city": "Oslo"})]),
    ("llama3", '{"name": "get_time", "parameters": {"zone": "UTC"}}<|eom_id|>', [("get_time", {"zone": "UTC"})]),
    ("llama3", '{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}', [("a", {}), ("b", {"x": 1})]),
    ("llama3", "The weather is nice.", []),
    ("llama3", '{"not": "a call"}', []),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome"}}]',
     [("get_weather", {"city": "Rome"})]),
    ("mistral", '[{"name": "get_time", "arguments": "{\\"zone\\": \\"CET\\"}", "id": "x1"}]', [("get_time", {"zone": "CET"})]),
    ("mistral", '{"name": "get_time", "arguments": {}}', []),  # Mistral's calls are a list
    ("mistral", "[1, 2, 3]", []),
    ("template", '{"name": "get_time", "arguments": {"zone": "UTC"}}', [("get_time", {"zone": "UTC"})]),
])
def test_parse_tool_calls(fmt, text, calls):
    assert [(c.name, c.arguments) for c in tl.parse_tool_calls(fmt, text)] == calls


def _walk(tok, grammar, seed):
    """A random path through the grammar's mask; returns the tokens up to the stop token."""
    import torch
    from minillama.inference import constraints as C
    vocab = C.grammar_vocab(tok)
    state, ids, g = C.new_row_state(vocab, C.Constraint("lark", grammar)), [], torch.Generator().manual_seed(seed)
    for _ in range(400):
        choices = C.allowed(state).nonzero().flatten()
        t = int(choices[torch.randint(len(choices), (1,), generator=g)])
        if t in vocab.stop_ids:
            return ids
        C.advance(state, t)
        ids.append(t)
    raise AssertionError("no end")


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("fmt", ["llama3", "mistral"])
def test_forced_call_grammar_admits_only_calls_of_the_named_tool(fmt, seed, llama3, mistral3):
    pytest.importorskip("llguidance")
    tok = llama3 if fmt == "llama3" else mistral3
    ids = _walk(tok, tl.tool_call_grammar(fmt, tok, [WEATHER, TIME], {"type": "function",
                                                                      "function": {"name": "get_weather"}}), seed)
    marker = "<|python_tag|>" if fmt == "llama3" else "[TOOL_CALLS]"
    assert ids[0] == tok.token_id(marker)
    (call,) = tl.parse_tool_calls(fmt, tok.decode(ids))
    assert call.name == "get_weather" and set(call.arguments) == {"city", "unit"} and call.arguments["unit"] in "cf"


def test_required_grammar_admits_any_tool_and_a_bad_name_is_an_error(llama3):
    pytest.importorskip("llguidance")
    names = {tl.parse_tool_calls("llama3", llama3.decode(_walk(llama3, tl.tool_call_grammar(
        "llama3", llama3, [WEATHER, TIME], "required"), seed)))[0].name for seed in range(8)}
    assert names <= {"get_weather", "get_time"} and names
    with pytest.raises(ValueError, match="tool_choice names 'nope', which is not in tools"):
        tl.tool_call_grammar("llama3", llama3, [WEATHER], {"type": "function", "function": {"name": "nope"}})


def test_llama31_tool_call_round_trip_on_a_tiny_model_through_the_grammar(llama3, monkeypatch):
    """A random tiny Llama with the real Llama 3 tokenizer, the call forced by the grammar (deterministic), a free
    row beside it; the call is parsed, sent back with its result, and that dialog matches llama-models."""
    pytest.importorskip("llguidance")
    import torch
    from llama_models.datatypes import RawMessage, StopReason, ToolCall
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    from helpers import tiny_model
    from minillama.inference import constraints as C
    from minillama.inference.engine import Engine, EngineConfig
    from minillama.inference.request import Request
    monkeypatch.setattr(tl, "today", lambda: "21 September 2024")
    model = tiny_model(vocab_size=llama3.vocab_size, max_seq_len=2048)
    dialog = [{"role": "user", "content": "Weather in Paris?"}]
    prompt = llama3.encode_dialog(dialog, format="llama3", tools=[WEATHER])
    grammar = tl.tool_call_grammar("llama3", llama3, [WEATHER], {"type": "function", "function": {"name": "get_weather"}})
    vocab = lambda: C.grammar_vocab(llama3)  # noqa: E731
    engine = Engine(model, EngineConfig(batch_size=2, cache_len=1024), grammar=vocab)
    stops = frozenset(llama3.stop_ids)
    free = engine.submit(Request(prompt, 12, stop_ids=stops, key="free"))
    call_req = engine.submit(Request(prompt, 200, stop_ids=stops, key="call",
                                        constraint=C.Constraint("lark", grammar)))
    with torch.no_grad():
        while engine.busy:
            engine.step()
    assert call_req.finish == "stop" and call_req.output[0] == llama3.token_id("<|python_tag|>")
    (call,) = tl.parse_tool_calls("llama3", llama3.decode(call_req.output))
    assert call.name == "get_weather" and set(call.arguments) == {"city", "unit"}
    alone = Engine(model, EngineConfig(batch_size=1, cache_len=1024))
    solo = alone.submit(Request(prompt, 12, stop_ids=stops))
    with torch.no_grad():
        while alone.busy:
            alone.step()
    assert free.output == solo.output  # the constrained row beside it changed nothing

    follow = dialog + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": call.name, "arguments": json.dumps(call.arguments)}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'}]
    tools_turn = tl.LLAMA3_TOOLS_INTRO + json.dumps(WEATHER, indent=4) + tl.LLAMA3_TOOLS_OUTRO
    raw = [RawMessage(role="system", content=tl.llama3_system("", "21 September 2024")),
           RawMessage(role="user", content=tools_turn), RawMessage(role="user", content="Weather in Paris?"),
           RawMessage(role="assistant", content="", stop_reason=StopReason.end_of_message, tool_calls=[
               ToolCall(call_id="c1", tool_name=call.name, arguments=call.arguments)]),
           RawMessage(role="tool", content='{"temp": 21}')]
    expected = ChatFormat(Tokenizer(LLAMA3_MODEL)).encode_dialog_prompt(raw).tokens
    assert llama3.encode_dialog(follow, format="llama3", tools=[WEATHER]) == expected
