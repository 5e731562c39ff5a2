"""Checks on request fields shared by several services. Each failure raises
InvalidArgument with a sentence that names the field and says what to send."""

from __future__ import annotations

from mirador.v1 import common_pb2

from services.common.config import MiradorConfig, ModelSpec
from services.common.errors import InvalidArgument, NotFound

MAX_TEXT_BYTES = 32 * 1024
MAX_TOKENS_LIMIT = 4096
MAX_STOP_STRINGS = 8
MAX_TOP_LOGPROBS = 20  # as OpenAI's API allows
MAX_OPTION_BYTES = 1024  # an option is a label or a short answer


def require_text(value: str, field: str, max_bytes: int = MAX_TEXT_BYTES) -> str:
    if not value.strip():
        raise InvalidArgument(f"`{field}` is empty; send the text to work on")
    size = len(value.encode("utf-8"))
    if size > max_bytes:
        raise InvalidArgument(f"`{field}` is {size} bytes; send at most {max_bytes} bytes")
    return value


def require_model(config: MiradorConfig, name: str, field: str = "model") -> ModelSpec:
    if not name:
        raise InvalidArgument(f"`{field}` is empty; name a model of the fleet: {', '.join(sorted(config.fleet))}")
    try:
        return config.fleet[name]
    except KeyError:
        raise NotFound(f"model `{name}` is not in the fleet; known models: {', '.join(sorted(config.fleet))}") from None


def require_messages(messages, prompt: str = "", *, allow_prompt: bool = True) -> None:
    """A conversation (or, where allowed, a raw prompt) that a model can answer."""
    if allow_prompt and messages and prompt:
        raise InvalidArgument("set `messages` or `prompt`, not both")
    if allow_prompt and prompt:
        require_text(prompt, "prompt")
        return
    if not messages:
        wanted = "`messages` (or a raw `prompt`)" if allow_prompt else "`messages`"
        raise InvalidArgument(f"no input: send {wanted}")
    for i, message in enumerate(messages):
        if message.role == common_pb2.ROLE_UNSPECIFIED or message.role not in common_pb2.Role.values():
            raise InvalidArgument(
                f"`messages[{i}].role` is {message.role}, unset or unknown; use ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT"
            )
        require_text(message.content, f"messages[{i}].content")
    if messages[-1].role == common_pb2.ROLE_ASSISTANT:
        raise InvalidArgument("the last message is the assistant's; end `messages` with the turn to answer")


def require_sampling(sampling: common_pb2.SamplingParams) -> None:
    if sampling.max_tokens > MAX_TOKENS_LIMIT:
        raise InvalidArgument(f"`sampling.max_tokens` is {sampling.max_tokens}; ask for at most {MAX_TOKENS_LIMIT}")
    if not 0.0 <= sampling.temperature <= 2.0:
        raise InvalidArgument(f"`sampling.temperature` is {sampling.temperature:g}; use 0 (greedy) up to 2")
    if not 0.0 <= sampling.top_p <= 1.0:
        raise InvalidArgument(f"`sampling.top_p` is {sampling.top_p:g}; use a value in (0, 1], or 0 for off")
    if len(sampling.stop) > MAX_STOP_STRINGS:
        raise InvalidArgument(f"{len(sampling.stop)} stop strings given; send at most {MAX_STOP_STRINGS}")
    if any(not s for s in sampling.stop):
        raise InvalidArgument("`sampling.stop` holds an empty string; remove it")
    if sampling.top_logprobs > MAX_TOP_LOGPROBS:
        raise InvalidArgument(f"`sampling.top_logprobs` is {sampling.top_logprobs}; ask for 0 to {MAX_TOP_LOGPROBS} "
                              "alternatives per token")


def require_options(options, field: str = "options", minimum: int = 2, maximum: int = 32) -> None:
    if not minimum <= len(options) <= maximum:
        raise InvalidArgument(f"{len(options)} `{field}` given; send between {minimum} and {maximum}")
    if any(not o.strip() for o in options):
        raise InvalidArgument(f"`{field}` holds an empty option; every option needs text")
    longest = max(len(o.encode("utf-8")) for o in options)
    if longest > MAX_OPTION_BYTES:
        raise InvalidArgument(f"`{field}` holds an option of {longest} bytes; an option is a label or a short answer "
                              f"of at most {MAX_OPTION_BYTES} bytes")
    if len(set(options)) != len(options):
        raise InvalidArgument(f"`{field}` repeats an option; options must be distinct")
