"""Prompt pieces: how the prefix, each passage and the question are written and tokenised.

A prompt is built from separately tokenised pieces, so a passage's tokens (and therefore its cache)
never depend on its neighbours:

    [prefix: chat header + system text + context header] [passage 1] ... [passage k] [question + tail]

Sequential prefill concatenates the same token ids: tokenising the joined string would give other ids
at the seams, and the cached modes could then never match it.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvrag.errors import InvalidInputError

DEFAULT_SYSTEM = (
    "You answer questions using only the passages given by the user. "
    "Reply with the shortest exact phrase from the passages that answers the question, not a full sentence."
)
# Stands in for the user's content when the chat template is rendered, to split it into head and tail.
_SENTINEL = "\u2063KVRAG-USER-CONTENT\u2063"
# End-of-turn tokens of common chat formats: generation stops on them as on EOS.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


@dataclass(frozen=True)
class PromptFormat:
    """How pieces are written. Any change changes token ids, and so every cache key."""

    system: str = DEFAULT_SYSTEM
    context_header: str = "Passages:\n\n"
    passage_template: str = "{title}\n{text}\n\n"
    passage_template_untitled: str = "{text}\n\n"
    question_template: str = "Question: {question}"
    # Text that starts the assistant's reply (part of the question piece), e.g. "Answer:".
    response_prefix: str = ""
    # Worked examples as earlier chat turns (user text, assistant reply), part of the cached prefix.
    examples: tuple[tuple[str, str], ...] = ()


PROMPTS: dict[str, PromptFormat] = {
    # General answers for people: a sentence or two, from the passages.
    "chat": PromptFormat(
        system="You answer questions using only the passages given by the user. Answer briefly and say so "
        "when the passages do not contain the answer."
    ),
    # Extractive QA (evaluation): the reply is primed so that the model continues with the span itself.
    "extractive": PromptFormat(
        system="You are an extractive question answering system. Reply with only the exact words from the "
        "passages that answer the question.",
        response_prefix="The answer is",
    ),
}


def prompt_format(prompt: str | PromptFormat | None) -> PromptFormat:
    """A prompt format by name (`chat`, `extractive`), as given, or the chat default."""
    if prompt is None:
        return PROMPTS["chat"]
    if isinstance(prompt, PromptFormat):
        return prompt
    if prompt not in PROMPTS:
        raise InvalidInputError(f"unknown prompt {prompt!r}: choose one of {', '.join(PROMPTS)}")
    return PROMPTS[prompt]


@dataclass(frozen=True)
class PromptPieces:
    """What a prompt format gives under one tokenizer: the cached prefix's ids, the text that follows
    the question (the chat template's tail) and the token ids that end an answer."""

    prefix_ids: list[int]
    tail: str
    stop_ids: frozenset[int]


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of a piece, without special tokens (pieces are concatenated as ids)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_head_tail(tokenizer, fmt: PromptFormat) -> tuple[str, str]:
    """The text before and after the user's content in the chat template (system text and worked
    examples included); a plain layout when the tokenizer has no chat template."""
    head, tail = "", ""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": fmt.system}] if fmt.system else []
        for user, assistant in fmt.examples:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        messages.append({"role": "user", "content": _SENTINEL})
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if _SENTINEL in rendered:
            head, tail = rendered.split(_SENTINEL, 1)
    if not head and not tail:
        head = (fmt.system + "\n\n") if fmt.system else ""
        tail = "\nAnswer: "
    bos = tokenizer.bos_token if tokenizer.bos_token and getattr(tokenizer, "add_bos_token", False) else ""
    if bos and not head.startswith(bos):
        head = bos + head
    return head, tail


def stop_token_ids(tokenizer, generation_config) -> frozenset[int]:
    """EOS ids of the tokenizer and the generation config, plus known end-of-turn tokens."""
    stop = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    eos = getattr(generation_config, "eos_token_id", None)
    if isinstance(eos, int):
        stop.add(eos)
    elif eos:
        stop.update(eos)
    for special in _END_OF_TURN:
        tid = tokenizer.convert_tokens_to_ids(special)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            stop.add(tid)
    return frozenset(i for i in stop if i is not None)


def prompt_pieces(tokenizer, fmt: PromptFormat, generation_config) -> PromptPieces:
    """The fixed pieces of `fmt` under `tokenizer`."""
    head, tail = chat_head_tail(tokenizer, fmt)
    return PromptPieces(
        encode(tokenizer, head + fmt.context_header), tail, stop_token_ids(tokenizer, generation_config)
    )


def passage_ids(tokenizer, fmt: PromptFormat, text: str, title: str | None, max_tokens: int) -> list[int]:
    """Token ids of one passage piece, truncated to `max_tokens`."""
    if title:
        piece = fmt.passage_template.format(title=title.strip(), text=text.strip())
    else:
        piece = fmt.passage_template_untitled.format(text=text.strip())
    return encode(tokenizer, piece)[:max_tokens]


def question_ids(tokenizer, fmt: PromptFormat, tail: str, question: str) -> list[int]:
    """Token ids of the question piece: the question, the chat template's tail and the reply's start."""
    question = question.strip()
    if not question:
        raise InvalidInputError("the question is empty")
    return encode(tokenizer, fmt.question_template.format(question=question) + tail + fmt.response_prefix)
