"""Every error a client may be told about, in one place. The front ends catch these and only these;
anything else is a bug, logged with its traceback and reported as an internal error (a 500, or an `error`
naming the request), never as the client's fault.

    LLMWSError
    ├── Refused          the request cannot be acted on as it is; names the field, carries extra fields
    │   └── ContextTooLong   the prompt leaves no room to generate (max_context, input_length)
    ├── Busy             refused for now, not for what it says: a queue or the sessions are full
    │   └── SessionsFull     every session is in use and none may be forgotten to make room
    └── ConfigError      config.json cannot be used (names the file, line and key)
"""

OUT_OF_MEMORY = "CUDA out of memory. Context too long. Please retry with shorter input."


class LLMWSError(Exception):
    """The base of every error the server reports to a client or an operator on purpose."""


class Refused(LLMWSError):
    """A request refused for what it says; `field` names the part at fault, `fields` go beside the message."""

    def __init__(self, message: str, field: str | None = None, **fields: object):
        super().__init__(message)
        self.field = field
        self.fields: dict = fields  # as events.Failed.fields: any JSON values


class ContextTooLong(Refused):
    """The prompt is as long as the context or longer."""

    def __init__(self, tokens_in: int, max_context: int, estimated: bool = False, characters: int = 0):
        if estimated:
            text = (f"Context too long (at least {tokens_in} tokens, estimated from {characters} characters). "
                    f"Max: {max_context}. Please retry with shorter input.")
            super().__init__(text, "messages", max_context=max_context, input_length=tokens_in,
                             input_length_estimated=True)
        else:
            text = f"Context too long ({tokens_in} tokens). Max: {max_context}. Please retry with shorter input."
            super().__init__(text, "messages", max_context=max_context, input_length=tokens_in)


class Busy(LLMWSError):
    """No room now: the server's or the session's queue, or its buffer, is full. Retry later."""


class SessionsFull(Busy):
    """Every session is in use: nobody's may be forgotten to make room."""


class ConfigError(LLMWSError):
    """config.json (or a setting in it) cannot be used."""
