"""Tool calling: the tool list and calls as each chat format writes them, the model's output parsed back into calls,
and the grammar that forces a call (tool_choice "required" or a named function).

    calls = parse_tool_calls("llama3", text)         # [] when the text is a plain answer
    grammar = tool_call_grammar("mistral", tok, tools, "required")   # Lark for constraints.Constraint("lark", ...)

Llama 3.1 follows Meta's JSON tool calling (llama-models, llama3_1/prompt_format.md): "Environment: ipython" in the
system prompt, the functions listed in a user turn, the call as <|python_tag|>{"type": "function", "name", "parameters"}
ended by <|eom_id|>, tool results in the ipython role. Mistral follows mistral-common's v3 instruct tokenizer:
[AVAILABLE_TOOLS] before the last user turn, [TOOL_CALLS][{"name", "arguments", "id"}], [TOOL_RESULTS]{...}.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Optional

LLAMA3_TOOLS_INTRO = ("Answer the user's question by making use of the following functions if needed.\n"
                      "If none of the function can be used, please say so.\n"
                      "Here is a list of functions in JSON format:\n")
LLAMA3_TOOLS_OUTRO = "\n\nReturn function calls in JSON format."


@dataclass
class ToolCall:
    """One call the assistant makes: the function's name, its arguments, and the call's id (if any)."""

    name: str
    arguments: dict
    id: Optional[str] = None

    def openai(self, index: int) -> dict:
        """The call in OpenAI's response shape (arguments as a JSON string)."""
        return {"id": self.id or f"call_{index}", "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


def check_tools(tools) -> list[dict]:
    """OpenAI's tools list, checked: [{"type": "function", "function": {"name", "description"?, "parameters"?}}]."""
    if not isinstance(tools, list):
        raise ValueError("tools must be a list of {type: function, function: {name, description, parameters}}")
    out = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"tools[{i}] must be {{type: function, function: {{name, description, parameters}}}}")
        if not isinstance(fn.get("parameters", {}), (dict, type(None))):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
        out.append({"type": "function", "function": fn})
    return out


def tool_names(tools: list[dict]) -> list[str]:
    return [t["function"]["name"] for t in tools]


def parse_call(c, where: str) -> ToolCall:
    """An assistant message's tool call, OpenAI's {"id", "function": {"name", "arguments": JSON text}} or flat."""
    fn = c.get("function", c) if isinstance(c, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ValueError(f"{where} must be {{id, type: function, function: {{name, arguments}}}}")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}.function.arguments is not valid JSON ({e.msg})") from None
    if not isinstance(args, dict):
        raise ValueError(f"{where}.function.arguments must be a JSON object")
    return ToolCall(fn["name"], args, c.get("id"))


# ---- the prompt side ----

def today() -> str:
    return time.strftime("%d %B %Y")


def llama3_system(system: str, date: str) -> str:
    """Llama 3.1's system prompt when tools are offered (prompt_format.md, "JSON based tool calling")."""
    return f"Environment: ipython\n\nCutting Knowledge Date: December 2023\nToday Date: {date}\n\n{system}\n"


def llama3_tools_turn(tools: list[dict]) -> str:
    """The user turn that lists the functions, before the user's own first turn."""
    return LLAMA3_TOOLS_INTRO + "\n".join(json.dumps(t, indent=4) for t in tools) + LLAMA3_TOOLS_OUTRO


def llama3_call_text(call: ToolCall) -> str:
    return json.dumps({"type": "function", "name": call.name, "parameters": call.arguments})


def mistral_tools_text(tools: list[dict]) -> str:
    """[AVAILABLE_TOOLS]'s JSON, as mistral-common dumps its Tool models (description defaults to "")."""
    dumped = [{"type": "function", "function": {"name": t["function"]["name"],
                                                "description": t["function"].get("description") or "",
                                                "parameters": t["function"].get("parameters") or {}}}
              for t in tools]
    return json.dumps(dumped, ensure_ascii=False)


def mistral_calls_text(calls: list[ToolCall]) -> str:
    out = []
    for c in calls:
        d = {"name": c.name, "arguments": c.arguments}
        if c.id and c.id != "null":
            d["id"] = c.id
        out.append(d)
    return json.dumps(out, ensure_ascii=False)


def mistral_result_text(content: str, call_id: Optional[str]) -> str:
    try:
        parsed = json.loads(content)
    except json.JSONDecodeError:
        parsed = content
    return json.dumps({"content": parsed, "call_id": call_id}, ensure_ascii=False)


# ---- the output side ----

def _calls_from(obj, args_key: str) -> list[ToolCall]:
    items = obj if isinstance(obj, list) else [obj]
    calls = []
    for it in items:
        if not (isinstance(it, dict) and isinstance(it.get("name"), str)):
            return []
        args = it.get(args_key, it.get("arguments", it.get("parameters", {})))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return []
        if not isinstance(args, dict):
            return []
        calls.append(ToolCall(it["name"], args, it.get("id")))
    return calls


def parse_tool_calls(fmt: str, text: str) -> list[ToolCall]:
    """The calls in a model's answer (an empty list: a plain answer). llama3: [<|python_tag|>]{"name",
    "parameters"} (several separated by ";"); mistral: [TOOL_CALLS][{"name", "arguments"}] (the control token may
    already be gone from the decoded text); template: either shape, or a bare {"name", "arguments"}."""
    s = text.strip()
    for marker in ("<|python_tag|>", "[TOOL_CALLS]"):
        s = s.removeprefix(marker)
    for end in ("<|eom_id|>", "<|eot_id|>", "</s>"):
        s = s.removesuffix(end)
    s = s.strip()
    if not s.startswith(("{", "[")):
        return []
    try:
        obj = json.loads(s)
    except json.JSONDecodeError:
        if fmt != "llama3" or ";" not in s:
            return []
        try:  # Llama 3.1 may write several JSON calls separated by semicolons
            obj = [json.loads(part) for part in s.split(";") if part.strip()]
        except json.JSONDecodeError:
            return []
    if fmt == "mistral" and not isinstance(obj, list):
        return []
    return _calls_from(obj, "parameters" if fmt == "llama3" else "arguments")


# ---- forcing a call ----

def _call_schema(fmt: str, tool: dict) -> dict:
    fn = tool["function"]
    params = fn.get("parameters") or {"type": "object"}
    if fmt == "llama3":
        props = {"type": {"const": "function"}, "name": {"const": fn["name"]}, "parameters": params}
        required = ["type", "name", "parameters"]
    else:
        props, required = {"name": {"const": fn["name"]}, "arguments": params}, ["name", "arguments"]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def chosen_tools(tools: list[dict], choice) -> list[dict]:
    """The tools a tool_choice allows: all for "auto"/"required", one for a named function, none for "none"."""
    if choice in (None, "auto", "required"):
        return tools
    if choice == "none":
        return []
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    picked = [t for t in tools if t["function"]["name"] == name]
    if not picked:
        raise ValueError(f"tool_choice names {name!r}, which is not in tools ({', '.join(tool_names(tools))})")
    return picked


def tool_call_grammar(fmt: str, tok, tools: list[dict], choice) -> str:
    """A Lark grammar (llguidance's dialect) whose every sentence is one call of the chosen tool(s) in fmt."""
    picked = chosen_tools(tools, choice)
    one = {"anyOf": [_call_schema(fmt, t) for t in picked]} if len(picked) > 1 else _call_schema(fmt, picked[0])
    compact = {"x-guidance": {"whitespace_flexible": False}}  # no runs of whitespace for a small model to loop in
    if fmt == "llama3":
        return f"start: <[{tok.token_id('<|python_tag|>')}]> call\ncall: %json {json.dumps({**one, **compact})}\n"
    if fmt == "mistral":
        calls = {"type": "array", "items": one, "minItems": 1, **compact}
        if isinstance(choice, dict):  # a named function: one call of it
            calls["maxItems"] = 1
        return f"start: <[{tok.token_id('[TOOL_CALLS]')}]> calls\ncalls: %json {json.dumps(calls)}\n"
    return f"start: call\ncall: %json {json.dumps({**one, **compact})}\n"
