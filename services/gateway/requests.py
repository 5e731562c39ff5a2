"""OpenAI request bodies read into Mirador's terms, every problem a 400 naming the field.

Checked here: the JSON types and ranges of each field, and the fields Mirador cannot honour
(`n` > 1, tools, penalties), refused with a sentence instead of being ignored.
What only the mesh knows (a route or model that does not exist, a text too long for the
model) is left to the router, whose status and sentence reach the client unchanged.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from mirador.v1 import common_pb2

from services.common.validation import MAX_TOP_LOGPROBS
from services.gateway.errors import invalid

MAX_TOKENS_LIMIT = 4096  # the model host's limit (services/common/validation.py)
MAX_STOP_STRINGS = 8
MAX_USER_CHARS = 256
MAX_EMBED_INPUTS = 256
MIN_TEMPERATURE = 1e-4  # lower temperatures are sent as 0 (greedy)
AUTO = "auto"

ROLES = {"system": common_pb2.ROLE_SYSTEM, "developer": common_pb2.ROLE_SYSTEM, "user": common_pb2.ROLE_USER,
         "assistant": common_pb2.ROLE_ASSISTANT}

# Fields Mirador cannot honour: refused unless they hold the value that asks for nothing.
_UNSUPPORTED = {
    "tools": "tools (function calling) are not supported: the fleet's models are not trained to call them; "
             "remove `tools`",
    "tool_choice": "tool_choice needs tools, which are not supported; remove `tool_choice`",
    "functions": "functions (function calling) are not supported; remove `functions`",
    "function_call": "function_call needs functions, which are not supported; remove `function_call`",
    "logit_bias": "logit_bias is not supported by the model host; remove `logit_bias`",
    "presence_penalty": "presence_penalty is not supported by the model host; send 0 or leave it out",
    "frequency_penalty": "frequency_penalty is not supported by the model host; send 0 or leave it out",
    "audio": "audio output is not supported; remove `audio`",
    "prediction": "predicted outputs are not supported; remove `prediction`",
    "suffix": "suffix (insertion) is not supported; remove `suffix`",
    "echo": "echo is not supported; remove `echo`",
    "best_of": "best_of is not supported; send 1 or leave it out",
}
# Fields accepted and not acted on: they change nothing about the answer.
_IGNORED = {"store", "metadata", "service_tier", "parallel_tool_calls", "modalities", "reasoning_effort",
            "web_search_options", "safety_identifier", "prompt_cache_key", "verbosity"}


@dataclass
class GenerationRequest:
    """A chat or text completion, as the router will be asked for it."""

    model: str
    messages: list[common_pb2.ChatMessage] = field(default_factory=list)
    prompt: str = ""
    sampling: common_pb2.SamplingParams = field(default_factory=common_pb2.SamplingParams)
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    user: str = ""


@dataclass
class EmbeddingRequest:
    model: str
    texts: list[str]
    user: str = ""


def parse_json(body: bytes) -> dict:
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise invalid("the body is not UTF-8; send JSON text") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise invalid(f"the body is not valid JSON ({str(exc)[:120]}); send a JSON object") from None
    if not isinstance(data, dict):
        raise invalid(f"the body is a JSON {_kind(data)}; send a JSON object with `model` and the request's fields")
    return data


def parse_chat(data: dict) -> GenerationRequest:
    _refuse_unknown(data, ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
                           "stop", "stream", "stream_options", "logprobs", "top_logprobs", "user", "n",
                           "response_format"))
    request = GenerationRequest(model=_model(data))
    request.messages = _messages(data.get("messages"))
    _common(data, request)
    request.logprobs = _boolean(data.get("logprobs", False), "logprobs")
    top_logprobs = data.get("top_logprobs")
    if top_logprobs is not None:
        request.sampling.top_logprobs = _integer(top_logprobs, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        if top_logprobs > 0 and not request.logprobs:
            raise invalid("top_logprobs needs `logprobs: true` (the alternatives come with each token's logprob)",
                          "top_logprobs")
    response_format = data.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise invalid("response_format other than {\"type\": \"text\"} is not supported: the models cannot be held to "
                      "JSON output; leave it out", "response_format")
    limit = _pick_max_tokens(data)
    if limit:
        request.sampling.max_tokens = limit
    return request


def parse_completion(data: dict) -> GenerationRequest:
    _refuse_unknown(data, ("model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream",
                           "stream_options", "logprobs", "user", "n"))
    request = GenerationRequest(model=_model(data))
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list):
        raise invalid("`prompt` as a list of prompts or of token ids is not supported; send one prompt as a string",
                      "prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise invalid("`prompt` must be a non-empty string", "prompt")
    request.prompt = prompt
    _common(data, request)
    if data.get("logprobs") is not None:  # the legacy API: how many alternatives per token, 0 to 5
        request.logprobs = True
        request.sampling.top_logprobs = _integer(data["logprobs"], "logprobs", 0, 5)
    if "max_tokens" in data:
        request.sampling.max_tokens = _integer(data["max_tokens"], "max_tokens", 1, MAX_TOKENS_LIMIT)
    return request


def parse_embeddings(data: dict) -> EmbeddingRequest:
    _refuse_unknown(data, ("model", "input", "encoding_format", "user", "dimensions"))
    model = _model(data)
    texts = data.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts:
        raise invalid("`input` must be a string or a non-empty list of strings", "input")
    if len(texts) > MAX_EMBED_INPUTS:
        raise invalid(f"`input` holds {len(texts)} texts; send at most {MAX_EMBED_INPUTS} per request", "input")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            kind = "token ids" if isinstance(text, (int, list)) else f"a {_kind(text)}"
            raise invalid(f"`input[{i}]` is {kind}; send text (token-id input is not supported)", "input")
        if not text.strip():
            raise invalid(f"`input[{i}]` is empty; every text needs characters to embed", "input")
    encoding = data.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise invalid(f"`encoding_format` must be \"float\" or \"base64\", got {_show(encoding)}", "encoding_format")
    if data.get("dimensions") is not None:
        raise invalid("`dimensions` is not supported: the embedding models have a fixed size; leave it out",
                      "dimensions")
    return EmbeddingRequest(model=model, texts=texts, user=_user(data))


def embedding_encoding(data: dict) -> str:
    return data.get("encoding_format", "float")


# --------------------------------------------------------------------------- fields


def _refuse_unknown(data: dict, known: tuple[str, ...]) -> None:
    for name, value in data.items():
        if name in _UNSUPPORTED:
            if not _asks_nothing(name, value):
                raise invalid(_UNSUPPORTED[name], name)
        elif name not in known and name not in _IGNORED:
            raise invalid(f"unrecognized field `{name[:80]}`; this endpoint takes: {', '.join(known)}", name[:80])


def _asks_nothing(name: str, value) -> bool:
    """True when an unsupported field holds the value that asks for nothing (what some clients always send)."""
    if value is None or value is False:
        return True
    if isinstance(value, bool):
        return False
    if name in ("presence_penalty", "frequency_penalty"):
        return isinstance(value, (int, float)) and value == 0
    if name == "best_of":
        return isinstance(value, int) and value == 1
    if name in ("tools", "functions", "logit_bias"):
        return value == [] or value == {}
    if name in ("tool_choice", "function_call"):
        return value == "none"
    if name == "suffix":
        return value == ""
    return False


def _model(data: dict) -> str:
    model = data.get("model")
    if not isinstance(model, str) or not model.strip():
        raise invalid("`model` is missing or empty; name a route, a fleet model, or `auto` (GET /v1/models lists them)",
                      "model")
    return model


def _messages(value) -> list[common_pb2.ChatMessage]:
    if not isinstance(value, list) or not value:
        raise invalid("`messages` must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(f"`{where}` is a JSON {_kind(message)}; send an object with `role` and `content`", where)
        role = message.get("role")
        if role in ("tool", "function"):
            raise invalid(f"`{where}.role` is {role!r}: tool results need tools, which are not supported", where)
        if not isinstance(role, str) or role not in ROLES:
            raise invalid(f"`{where}.role` is {_show(role)}; use system, developer, user or assistant", f"{where}.role")
        content = _content(message.get("content"), where)
        if message.get("tool_calls"):
            raise invalid(f"`{where}.tool_calls` needs tools, which are not supported; remove it", where)
        messages.append(common_pb2.ChatMessage(role=ROLES[role], content=content))
    if messages[-1].role == common_pb2.ROLE_ASSISTANT:
        raise invalid("the last message is the assistant's; end `messages` with the turn to answer", "messages")
    return messages


def _content(value, where: str) -> str:
    if isinstance(value, str):
        if not value.strip():
            raise invalid(f"`{where}.content` is empty; every message needs text", f"{where}.content")
        return value
    if isinstance(value, list) and value:
        texts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else _kind(part)
                raise invalid(f"`{where}.content[{j}]` is {_show(kind)}; only text parts "
                              "({\"type\": \"text\", \"text\": ...}) are supported", f"{where}.content")
            texts.append(part["text"])
        if "".join(texts).strip():
            return "\n".join(texts)
    raise invalid(f"`{where}.content` must be a non-empty string (or a list of text parts)", f"{where}.content")


def _common(data: dict, request: GenerationRequest) -> None:
    n = data.get("n")
    if n is not None:
        _integer(n, "n", 1, 128)
        if n != 1:
            raise invalid(f"n={n} is not supported: the gateway returns one choice; send n=1 (or leave it out) and "
                          "repeat the request for more answers", "n")
    sampling = request.sampling
    if data.get("temperature") is not None:
        temperature = _number(data["temperature"], "temperature", 0.0, 2.0)
        # Below this, sampling is greedy to float precision; sent as it is, the host's float32
        # logits / T overflow to NaN (a model-host bug, reported) and the call fails.
        sampling.temperature = temperature if temperature >= MIN_TEMPERATURE else 0.0
    if data.get("top_p") is not None:
        top_p = _number(data["top_p"], "top_p", 0.0, 1.0)
        if top_p == 0.0:
            raise invalid("`top_p` is 0; use a value in (0, 1] (1 = off), or temperature 0 for greedy answers", "top_p")
        sampling.top_p = top_p
    if data.get("seed") is not None:
        sampling.seed = _integer(data["seed"], "seed", 0, 2**64 - 1)
    stop = data.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise invalid("`stop` must be a non-empty string or a list of non-empty strings", "stop")
        if len(stops) > MAX_STOP_STRINGS:
            raise invalid(f"`stop` holds {len(stops)} strings; send at most {MAX_STOP_STRINGS}", "stop")
        sampling.stop.extend(stops)
    request.stream = _boolean(data.get("stream", False), "stream")
    options = data.get("stream_options")
    if options is not None:
        if not request.stream:
            raise invalid("`stream_options` is only allowed with `stream: true`", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"}:
            raise invalid("`stream_options` must be an object with `include_usage` (true or false)", "stream_options")
        request.include_usage = _boolean(options.get("include_usage", False), "stream_options.include_usage")
    request.user = _user(data)


def _pick_max_tokens(data: dict) -> int:
    values = {name: _integer(data[name], name, 1, MAX_TOKENS_LIMIT)
              for name in ("max_completion_tokens", "max_tokens") if data.get(name) is not None}
    if len(set(values.values())) > 1:
        raise invalid("`max_tokens` and `max_completion_tokens` differ; send one of them", "max_completion_tokens")
    return next(iter(values.values()), 0)


def _user(data: dict) -> str:
    user = data.get("user", "")
    if user is None:
        return ""
    if not isinstance(user, str) or len(user) > MAX_USER_CHARS:
        raise invalid(f"`user` must be a string of at most {MAX_USER_CHARS} characters", "user")
    return user


def _integer(value, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise invalid(f"`{name}` must be a whole number from {low} to {high}, got {_show(value)}", name)
    return value


def _number(value, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise invalid(f"`{name}` must be a number from {low:g} to {high:g}, got {_show(value)}", name)
    return float(value)


def _boolean(value, name: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(f"`{name}` must be true or false, got {_show(value)}", name)
    return value


def _kind(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _show(value) -> str:
    text = json.dumps(value, ensure_ascii=True) if isinstance(value, (str, int, float, bool, type(None))) else _kind(value)
    return text if len(text) <= 60 else text[:57] + "..."
