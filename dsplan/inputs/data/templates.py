"""Conversations to text pieces: dsplan's copy of LF 0.9.5's chat templates, and rendering with them.

One job: the :data:`TEMPLATES` table (slots, stop words, tool formats of the LF templates
dsplan models), picking the one a spec names (with its tool-format and default-system
overrides), and rendering a :class:`~dsplan.inputs.data.formats.Conv` into the element
lists LF tokenizes: strings one by one, with BOS/EOS markers and tool prompts and tool
calls formatted as LF's ToolUtils format them.  Counting those pieces is not done here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime

from dsplan.inputs.data.formats import Conv
from dsplan.inputs.data.spec import DataSpec


# ---------------------------------------------------------------- LF's chat templates
BOS = ("bos_token",)
EOS = ("eos_token",)


@dataclass(frozen=True)
class Template:
    """dsplan's copy of one LF template: slots are strings with ``{{content}}``, BOS/EOS
    markers, or ("token", name) for a single named token.  ``kind``: "plain", "llama2"
    (the system text joins the first user message) or "reasoning" (empty thought added)."""

    user: tuple
    assistant: tuple
    system: tuple
    function: tuple
    function_format: str
    observation: tuple
    tool_format: str
    prefix: tuple = ()
    default_system: str = ""
    stop_words: tuple = ()
    efficient_eos: bool = False
    replace_eos: bool = False
    kind: str = "plain"
    thought_words: tuple = ("<think>\n", "\n</think>\n\n")
    tool_call_words: tuple = ("<tool_call>", "</tool_call>")


def _tpl(user=None, assistant=None, system=None, function=None, observation=None, tools="default", prefix=(),
         default_system="", stop_words=(), efficient_eos=False, replace_eos=False, kind="plain") -> Template:
    """LF's register_template defaults, for dsplan's table."""
    default_slots = ("{{content}}",) if efficient_eos else ("{{content}}", EOS)
    user_slots = tuple(user) if user else ("{{content}}",)
    assistant_slots = tuple(assistant) if assistant else default_slots
    fn_slots, fn_format = function if function else (assistant_slots if assistant else default_slots, "default")
    return Template(user=user_slots, assistant=assistant_slots, system=tuple(system) if system else ("{{content}}",),
                    function=tuple(fn_slots), function_format=fn_format,
                    observation=tuple(observation) if observation else user_slots, tool_format=tools,
                    prefix=tuple(prefix), default_system=default_system, stop_words=tuple(stop_words),
                    efficient_eos=efficient_eos, replace_eos=replace_eos, kind=kind)


_IM_USER = "<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n"
_IM_ASSISTANT = "{{content}}<|im_end|>\n"
_IM_SYSTEM = "<|im_start|>system\n{{content}}<|im_end|>\n"
_QWEN_OBS = "<|im_start|>user\n<tool_response>\n{{content}}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
_QWEN = dict(user=[_IM_USER], assistant=[_IM_ASSISTANT], system=[_IM_SYSTEM], function=([_IM_ASSISTANT], "qwen"),
             observation=[_QWEN_OBS], tools="qwen", stop_words=("<|im_end|>",), replace_eos=True)
_L3_USER = ("<|start_header_id|>user<|end_header_id|>\n\n{{content}}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")
_L3_OBS = ("<|start_header_id|>ipython<|end_header_id|>\n\n{{content}}<|eot_id|>"
           "<|start_header_id|>assistant<|end_header_id|>\n\n")
_GEMMA = dict(user=["<start_of_turn>user\n{{content}}<end_of_turn>\n<start_of_turn>model\n"],
              assistant=["{{content}}<end_of_turn>\n"], system=["{{content}}\n\n"],
              observation=["<start_of_turn>tool\n{{content}}<end_of_turn>\n<start_of_turn>model\n"],
              prefix=[BOS], kind="llama2")
_MISTRAL_TOOLS = dict(observation=['[TOOL_RESULTS] {"content": {{content}}}[/TOOL_RESULTS]'], tools="mistral",
                      prefix=[BOS])
_INTERN2_SYSTEM = (
    "You are an AI assistant whose name is InternLM (书生·浦语).\n"
    "- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI Laboratory "
    "(上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM (书生·浦语) can understand and communicate fluently in the language "
    "chosen by the user such as English and 中文."
)

#: The LF 0.9.5 templates dsplan can render on a login node (tests/test_dataset_real.py
#: checks each against LF's own definition).  Media placeholders of the vision
#: templates are not modelled.
TEMPLATES: dict[str, Template] = {
    "empty": _tpl(assistant=["{{content}}"]),
    "default": _tpl(user=["Human: {{content}}", EOS, "\nAssistant:"], assistant=["{{content}}", EOS, "\n"],
                    system=["System: {{content}}", EOS, "\n"]),
    "alpaca": _tpl(user=["### Instruction:\n{{content}}\n\n### Response:\n"], assistant=["{{content}}", EOS, "\n\n"],
                   default_system=("Below is an instruction that describes a task. "
                                   "Write a response that appropriately completes the request.\n\n")),
    "vicuna": _tpl(user=["USER: {{content}} ASSISTANT:"],
                   default_system=("A chat between a curious user and an artificial intelligence assistant. "
                                   "The assistant gives helpful, detailed, and polite answers to the user's questions.")),
    "chatml": _tpl(user=[_IM_USER], assistant=[_IM_ASSISTANT], system=[_IM_SYSTEM],
                   observation=["<|im_start|>tool\n{{content}}<|im_end|>\n<|im_start|>assistant\n"],
                   stop_words=("<|im_end|>", "<|im_start|>"), replace_eos=True),
    "qwen": _tpl(**_QWEN, default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
    "qwen2_vl": _tpl(**_QWEN, default_system="You are a helpful assistant."),
    "qwen3": _tpl(**_QWEN, kind="reasoning"),
    "qwen3_nothink": _tpl(**_QWEN),
    "yi": _tpl(user=[_IM_USER], assistant=[_IM_ASSISTANT], system=[_IM_SYSTEM], stop_words=("<|im_end|>",)),
    "intern2": _tpl(user=[_IM_USER], assistant=[_IM_ASSISTANT], system=[_IM_SYSTEM], prefix=[BOS],
                    default_system=_INTERN2_SYSTEM, stop_words=("<|im_end|>",)),
    "llama2": _tpl(user=[BOS, "[INST] {{content}} [/INST]"], system=["<<SYS>>\n{{content}}\n<</SYS>>\n\n"],
                   kind="llama2"),
    "llama3": _tpl(user=[_L3_USER], assistant=["{{content}}<|eot_id|>"],
                   system=["<|start_header_id|>system<|end_header_id|>\n\n{{content}}<|eot_id|>"],
                   function=(["{{content}}<|eot_id|>"], "llama3"), observation=[_L3_OBS], tools="llama3",
                   prefix=[BOS], stop_words=("<|eot_id|>", "<|eom_id|>"), replace_eos=True),
    "mistral": _tpl(user=["[INST] {{content}}[/INST]"], assistant=[" {{content}}", EOS], system=["{{content}}\n\n"],
                    function=(["[TOOL_CALLS] {{content}}", EOS], "mistral"), kind="llama2", **_MISTRAL_TOOLS),
    "ministral": _tpl(user=["[INST]{{content}}[/INST]"], system=["{{content}}\n\n"],
                      function=(["[TOOL_CALLS]{{content}}", EOS], "mistral"), kind="llama2",
                      **{**_MISTRAL_TOOLS, "observation": ['[TOOL_RESULTS]{"content": {{content}}}[/TOOL_RESULTS]']}),
    "deepseek": _tpl(user=["User: {{content}}\n\nAssistant:"], system=["{{content}}\n\n"], prefix=[BOS]),
    "deepseek3": _tpl(user=["<｜User｜>{{content}}<｜Assistant｜>"], prefix=[BOS]),
    "deepseekr1": _tpl(user=["<｜User｜>{{content}}<｜Assistant｜>"], prefix=[BOS], kind="reasoning"),
    "gemma": _tpl(**_GEMMA, stop_words=("<end_of_turn>",), replace_eos=True),
    "gemma2": _tpl(**_GEMMA, stop_words=("<eos>", "<end_of_turn>"), efficient_eos=True),
    "glm4": _tpl(user=["<|user|>\n{{content}}<|assistant|>"], assistant=["\n{{content}}"],
                 system=["<|system|>\n{{content}}"], function=(["{{content}}"], "glm4"),
                 observation=["<|observation|>\n{{content}}<|assistant|>"], tools="glm4", prefix=["[gMASK]<sop>"],
                 stop_words=("<|user|>", "<|observation|>"), efficient_eos=True),
    "phi": _tpl(user=["<|user|>\n{{content}}<|end|>\n<|assistant|>\n"], assistant=["{{content}}<|end|>\n"],
                system=["<|system|>\n{{content}}<|end|>\n"], stop_words=("<|end|>",), replace_eos=True),
    "phi4": _tpl(user=["<|im_start|>user<|im_sep|>{{content}}<|im_end|><|im_start|>assistant<|im_sep|>"],
                 assistant=["{{content}}<|im_end|>"], system=["<|im_start|>system<|im_sep|>{{content}}<|im_end|>"],
                 stop_words=("<|im_end|>",), replace_eos=True),
    "falcon": _tpl(user=["User: {{content}}\nFalcon:"], assistant=["{{content}}\n"], efficient_eos=True),
}
#: Stands in for a template dsplan has no copy of (a stated assumption, in the notes).
FALLBACK_TEMPLATE = "chatml"


def pick_template(spec: DataSpec, notes: list[str]) -> tuple[str, Template]:
    """The name ``spec`` gives and the template to render with: dsplan's copy, with the spec's
    tool_format and default_system applied (a name dsplan lacks: :data:`FALLBACK_TEMPLATE`, noted)."""
    name = spec.template or ""
    tpl = TEMPLATES.get(name)
    if tpl is None:
        shown = repr(name) if name else "none given (LF would read the tokenizer's chat template)"
        notes.append(f"template {shown}: dsplan has no copy of it; the per-turn overhead of "
                     f"{FALLBACK_TEMPLATE!r} is assumed")
        tpl = TEMPLATES[FALLBACK_TEMPLATE]
    changes = {}
    if spec.tool_format:
        slots = ("{{content}}",) if tpl.efficient_eos else ("{{content}}", EOS)
        changes.update(function=slots, function_format=spec.tool_format, tool_format=spec.tool_format)
    if spec.default_system is not None:
        changes["default_system"] = spec.default_system
    if changes:
        tpl = Template(**{**tpl.__dict__, **changes})
    return name, tpl


# ---------------------------------------------------------------- LF's tool formats
_DEFAULT_TOOL_PROMPT = (
    "You have access to the following tools:\n{tool_text}"
    "Use the following format if using a tool:\n"
    "```\n"
    "Action: tool name (one of [{tool_names}])\n"
    "Action Input: the input to the tool, in a JSON format representing the kwargs "
    """(e.g. ```{{"input": "hello world", "num_beams": 5}}```)\n"""
    "```\n"
)
_QWEN_TOOL_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tool_text}"
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    """<tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, """
    """"arguments": <args-json-object>}}\n</tool_call>"""
)
_LLAMA3_TOOL_PROMPT = (
    "Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n"
    "You have access to the following functions. To call a function, please respond with JSON for a function call. "
    """Respond in the format {{"name": function name, "parameters": dictionary of argument name and its value}}. """
    "Do not use variables.\n\n{tool_text}"
)
_GLM4_TOOL_PROMPT = (
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具{tool_text}"
)


def _wrap(tool: dict) -> dict:
    return tool if tool.get("type") == "function" else {"type": "function", "function": tool}


def _default_tools(tools: list) -> str:
    text, names = "", []
    for tool in tools:
        tool = tool.get("function", "") if tool.get("type") == "function" else tool
        params = ""
        props = tool.get("parameters", {}).get("properties", {})
        for name, p in props.items():
            required = ", required" if name in tool["parameters"].get("required", []) else ""
            enum = ", should be one of [{}]".format(", ".join(p["enum"])) if p.get("enum") else ""
            items = ", where each item should be {}".format(p["items"].get("type", "")) if p.get("items") else ""
            params += f"  - {name} ({p.get('type', '')}{required}): {p.get('description', '')}{enum}{items}\n"
        text += f"> Tool Name: {tool['name']}\nTool Description: {tool.get('description', '')}\nTool Args:\n{params}\n"
        names.append(tool["name"])
    return _DEFAULT_TOOL_PROMPT.format(tool_text=text, tool_names=", ".join(names))


def _tools_text(fmt: str, tools: list) -> str:
    """LF's ToolUtils.tool_formatter for ``fmt`` (another format: Qwen's, an estimate)."""
    if fmt == "default":
        return _default_tools(tools)
    if fmt == "llama3":
        text = "".join(json.dumps(_wrap(t), indent=4, ensure_ascii=False) + "\n\n" for t in tools)
        return _LLAMA3_TOOL_PROMPT.format(date=datetime.now().strftime("%d %b %Y"), tool_text=text)
    if fmt == "mistral":
        return "[AVAILABLE_TOOLS] " + json.dumps([_wrap(t) for t in tools], ensure_ascii=False) + "[/AVAILABLE_TOOLS]"
    if fmt == "glm4":
        text = ""
        for t in tools:
            t = t.get("function", "") if t.get("type") == "function" else t
            text += "\n\n## {name}\n\n{body}\n在调用上述函数时，请使用 Json 格式表示调用的参数。".format(
                name=t["name"], body=json.dumps(t, indent=4, ensure_ascii=False))
        return _GLM4_TOOL_PROMPT.format(tool_text=text)
    return _QWEN_TOOL_PROMPT.format(tool_text="".join("\n" + json.dumps(_wrap(t), ensure_ascii=False) for t in tools))


def _calls_text(fmt: str, calls: list[tuple[str, str]]) -> str:
    """LF's ToolUtils.function_formatter: the assistant's tool calls as text."""
    if fmt == "default":
        return "\n".join(f"Action: {name}\nAction Input: {args}" for name, args in calls)
    if fmt == "llama3":
        objs = [{"name": n, "parameters": json.loads(a)} for n, a in calls]
        return json.dumps(objs[0] if len(objs) == 1 else objs, ensure_ascii=False)
    if fmt == "mistral":
        return json.dumps([{"name": n, "arguments": json.loads(a)} for n, a in calls], ensure_ascii=False)
    if fmt == "glm4":
        return f"{calls[0][0]}\n{calls[0][1]}"
    texts = [json.dumps({"name": n, "arguments": json.loads(a)}, ensure_ascii=False) for n, a in calls]
    return "\n".join(f"<tool_call>\n{t}\n</tool_call>" for t in texts)


def _function_text(tpl: Template, content: str) -> str:
    """LF's FunctionFormatter on an assistant tool-call message (JSON it cannot parse stays as text)."""
    start, end = (re.escape(w) for w in tpl.tool_call_words)
    match = re.search(f"{start}(.*?){end}", content, re.DOTALL)
    prefix, body = (content.replace(match.group(0), ""), match.group(1)) if match else ("", content)
    if not match:
        t0, t1 = (re.escape(w) for w in tpl.thought_words)
        thought = re.search(f"{t0}(.*?){t1}", content, re.DOTALL)
        if thought:
            prefix, body = thought.group(0), content.replace(thought.group(0), "")
    try:
        calls = json.loads(body)
        calls = calls if isinstance(calls, list) else [calls]
        pairs = [(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in calls]
        return prefix + _calls_text(tpl.function_format, pairs)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return content


# ---------------------------------------------------------------- rendering a sample
def _apply(slots: tuple, content: str, idx: str = "") -> list:
    out = []
    for slot in slots:
        if isinstance(slot, str):
            slot = slot.replace("{{content}}", content, 1).replace("{{idx}}", idx, 1)
        out.append(slot)
    return out


def _tools_for(tpl: Template, tools: str) -> str:
    try:
        parsed = json.loads(tools)
    except ValueError:
        return tools  # LF would stop here; the estimate counts the text as it is
    if not isinstance(parsed, list) or not parsed:
        return ""
    try:
        return _tools_text(tpl.tool_format, [t for t in parsed if isinstance(t, dict)])
    except (KeyError, TypeError, AttributeError):
        return tools


def _encode(tpl: Template, messages: list[tuple[str, str]], system: str, tools: str) -> list[list]:
    """LF's Template._encode (and Llama2Template's), as element lists per message: strings are
    tokenized one by one, as LF does; markers count one token each."""
    system = system or tpl.default_system
    out = []
    for i, (role, content) in enumerate(messages):
        elements: list = []
        sys_text = ""
        if i == 0:
            elements += list(tpl.prefix)
            if system or tools:
                tool_text = _tools_for(tpl, tools) if tools else ""
                if tpl.kind == "llama2":
                    sys_text = _apply(tpl.system, system + tool_text)[0]
                else:
                    elements += _apply(tpl.system, system + tool_text)
        if role == "user":
            elements += _apply(tpl.user, sys_text + content, str(i // 2))
        elif role == "assistant":
            elements += _apply(tpl.assistant, content)
        elif role == "observation":
            elements += _apply(tpl.observation, content)
        else:  # function
            elements += _apply(tpl.function, _function_text(tpl, content))
        out.append(elements)
    return out


def _remove_thought(tpl: Template, content: str) -> str:
    t0, t1 = (re.escape(w) for w in tpl.thought_words)
    return re.sub(f"{t0}(.*?){t1}", "", content, flags=re.DOTALL).lstrip("\n")


def _has_thought(tpl: Template, content: str) -> bool:
    return tpl.thought_words[0].strip() in content or tpl.thought_words[1].strip() in content


def _multiturn(tpl: Template, conv: Conv, spec: DataSpec) -> list[list]:
    """LF's encode_multiturn (with ReasoningTemplate's empty-thought rule)."""
    msgs = list(conv.prompt + conv.response)
    if tpl.kind != "reasoning":
        return _encode(tpl, msgs, conv.system, conv.tools)
    discard = spec.mask_history and not spec.preserve_thinking
    for i in range(1, len(msgs), 2):
        if spec.enable_thinking is False or (discard and i < len(msgs) - 2):
            msgs[i] = (msgs[i][0], _remove_thought(tpl, msgs[i][1]))
    enc = _encode(tpl, msgs, conv.system, conv.tools)
    thought = tpl.thought_words[0] + tpl.thought_words[1]
    for i in ([len(msgs) - 2] if discard else range(0, len(msgs), 2)):
        if not _has_thought(tpl, msgs[i + 1][1]):
            if not spec.enable_thinking:
                enc[i] = enc[i] + [thought]
            else:
                enc[i + 1] = [thought] + enc[i + 1]
    return enc


def _oneturn(tpl: Template, prompt: list, answer: tuple, conv: Conv, spec: DataSpec) -> tuple[list, list]:
    """LF's encode_oneturn: (prompt elements, response elements)."""
    msgs = list(prompt) + [answer]
    if tpl.kind == "reasoning":
        for i in range(1, len(msgs) - 2, 2):
            if not spec.preserve_thinking:
                msgs[i] = (msgs[i][0], _remove_thought(tpl, msgs[i][1]))
        if spec.enable_thinking is False:
            msgs[-1] = (msgs[-1][0], _remove_thought(tpl, msgs[-1][1]))
    enc = _encode(tpl, msgs, conv.system, conv.tools)
    head, tail = [e for part in enc[:-1] for e in part], list(enc[-1])
    if tpl.kind == "reasoning" and not _has_thought(tpl, msgs[-1][1]):
        thought = tpl.thought_words[0] + tpl.thought_words[1]
        if not spec.enable_thinking:
            head.append(thought)
        else:
            tail.insert(0, thought)
    return head, tail


def render_parts(conv: Conv, tpl: Template, spec: DataSpec, eos_text: str, bos: bool) -> list[list]:
    """The element lists whose token counts make a sample's shape (see
    :func:`~dsplan.inputs.data.lengths.sample_length`)."""
    if spec.stage == "pt":  # LF's PretrainDatasetProcessor: the text plus the eos token's text
        eos_text = "<|end_of_text|>" if spec.template == "llama3" else eos_text
        text = (conv.prompt[0][1] if conv.prompt else "") + eos_text
        return [([BOS] if bos and not spec.packs else []) + [text]]
    if spec.pairwise:
        head, chosen = _oneturn(tpl, conv.prompt, conv.response[0], conv, spec)
        _, rejected = _oneturn(tpl, conv.prompt, conv.response[1], conv, spec)
        extra = [EOS] if tpl.efficient_eos else []
        return [head, chosen + extra, rejected + extra]
    if spec.stage == "kto":
        answer = conv.response[0] if conv.response[0][1] else conv.response[1]
        head, tail = _oneturn(tpl, conv.prompt, answer, conv, spec)
        return [head, tail + ([EOS] if tpl.efficient_eos else [])]
    return _multiturn(tpl, conv, spec)
